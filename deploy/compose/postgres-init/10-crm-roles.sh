#!/usr/bin/env bash
# Runs once, when the PostgreSQL container initialises an empty data directory.
# Creates the suite's two roles and its database, as shared/provisioning.py does for `crm up`:
#   crm_owner  owns the database and every schema and table in it; migrations connect as it;
#   crm_app    owns nothing, so forced row-level security applies to it; services connect as it.
set -euo pipefail

psql --set ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname postgres \
    --set owner_password="$OWNER_PASSWORD" --set app_password="$APP_PASSWORD" <<'SQL'
CREATE ROLE crm_owner LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB PASSWORD :'owner_password';
CREATE ROLE crm_app LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB PASSWORD :'app_password';
CREATE DATABASE crm OWNER crm_owner;
GRANT CONNECT, TEMPORARY ON DATABASE crm TO crm_app;
SQL
