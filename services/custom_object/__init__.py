"""Custom-object service: tenant-defined objects, fields, relationships and records of one shard."""

SERVICE = "custom_object"
SCHEMA = "custom"
