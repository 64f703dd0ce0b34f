"""Tenant-service rules as plain functions: no protobuf, no SQL."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import FieldViolation

SUBDOMAIN_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*[a-z0-9]$")
EMAIL_PATTERN = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$")
PLAN_TYPES = ("basic", "professional", "enterprise")
TENANT_STATUSES = ("active", "suspended", "cancelled")


@dataclass(frozen=True, slots=True)
class PasswordPolicy:
    min_length: int = 8
    require_uppercase: bool = True
    require_digit: bool = True
    require_special: bool = False


def validate_tenant_fields(name: str, subdomain: str, prefix: str = "tenant") -> list[FieldViolation]:
    violations = []
    if not name.strip():
        violations.append(FieldViolation(f"{prefix}.name", "must not be blank"))
    elif len(name) > 255:
        violations.append(FieldViolation(f"{prefix}.name", "must be at most 255 characters"))
    if not subdomain:
        violations.append(FieldViolation(f"{prefix}.subdomain", "is required"))
    elif len(subdomain) > 100:
        violations.append(FieldViolation(f"{prefix}.subdomain", "must be at most 100 characters"))
    elif not SUBDOMAIN_PATTERN.match(subdomain):
        violations.append(
            FieldViolation(
                f"{prefix}.subdomain",
                "must be lower-case letters, digits and '-', at least 2 characters, "
                "not starting or ending with '-'",
            )
        )
    return violations


def validate_email(email: str, field: str) -> list[FieldViolation]:
    if not email:
        return [FieldViolation(field, "is required")]
    if len(email) > 255 or not EMAIL_PATTERN.match(email):
        return [FieldViolation(field, "must be a valid e-mail address")]
    return []


def validate_password(password: str, field: str, policy: PasswordPolicy) -> list[FieldViolation]:
    problems = []
    if len(password) < policy.min_length:
        problems.append(f"at least {policy.min_length} characters")
    if policy.require_uppercase and not any(c.isupper() for c in password):
        problems.append("an upper-case letter")
    if policy.require_digit and not any(c.isdigit() for c in password):
        problems.append("a digit")
    if policy.require_special and all(c.isalnum() for c in password):
        problems.append("a special character")
    if problems:
        return [FieldViolation(field, "must contain " + ", ".join(problems))]
    return []


USER_ROLES = ("admin", "member", "read_only")
API_KEY_SCOPES = ("read", "write", "admin")
# Scopes a session carries, by the user's role.
ROLE_SCOPES = {"admin": ["read", "write", "admin"], "member": ["read", "write"], "read_only": ["read"]}
CONFIG_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
SHARD_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]*$")
ADDRESS_PATTERN = re.compile(r"^[A-Za-z0-9.\-_\[\]:]+:[0-9]{1,5}$")


def password_policy_from(value: object) -> PasswordPolicy:
    """The policy stored in system metadata (`system_config/password_policy`), with the seed's
    key names; unknown or missing keys keep the defaults."""
    if not isinstance(value, dict):
        return PasswordPolicy()
    defaults = PasswordPolicy()
    return PasswordPolicy(
        min_length=int(value.get("min_length", defaults.min_length)),
        require_uppercase=bool(value.get("require_uppercase", defaults.require_uppercase)),
        require_digit=bool(value.get("require_numbers", value.get("require_digit", defaults.require_digit))),
        require_special=bool(value.get("require_special", defaults.require_special)),
    )


def validate_password_policy(value: object, field: str) -> list[FieldViolation]:
    if not isinstance(value, dict):
        return [FieldViolation(field, "must be an object with min_length and require_* flags")]
    violations = []
    min_length = value.get("min_length", 8)
    if not isinstance(min_length, int | float) or int(min_length) != min_length or not 1 <= min_length <= 128:
        violations.append(FieldViolation(f"{field}.min_length", "must be a whole number from 1 to 128"))
    for flag in ("require_uppercase", "require_numbers", "require_digit", "require_special"):
        if flag in value and not isinstance(value[flag], bool):
            violations.append(FieldViolation(f"{field}.{flag}", "must be true or false"))
    return violations


def validate_name(value: str, field: str, max_length: int, pattern: re.Pattern[str]) -> list[FieldViolation]:
    if not value:
        return [FieldViolation(field, "is required")]
    if len(value) > max_length:
        return [FieldViolation(field, f"must be at most {max_length} characters")]
    if not pattern.match(value):
        return [FieldViolation(field, f"must match {pattern.pattern}")]
    return []


def validate_user_fields(email: str, first_name: str, last_name: str, role: str) -> list[FieldViolation]:
    violations = validate_email(email, "user.email")
    for field, value in (("user.first_name", first_name), ("user.last_name", last_name)):
        if len(value) > 100:
            violations.append(FieldViolation(field, "must be at most 100 characters"))
    if role not in USER_ROLES:
        violations.append(FieldViolation("user.role", "must be admin, member or read_only"))
    return violations


def validate_scopes(scopes: list[str], field: str) -> list[FieldViolation]:
    unknown = sorted(set(scopes) - set(API_KEY_SCOPES))
    if unknown:
        return [FieldViolation(field, f"unknown scope(s) {unknown}; use read, write, admin")]
    return []


@dataclass(frozen=True, slots=True)
class SignInOutcome:
    """What a failed sign-in does to the account: the new failure count and the lock, if any."""

    failed_count: int
    lock: bool


def after_failed_sign_in(failed_count: int, threshold: int) -> SignInOutcome:
    """Counts one more failure in a row; reaching the threshold locks the account and starts the
    count again, so the user gets a full set of attempts once the lock expires."""
    count = failed_count + 1
    if count >= threshold:
        return SignInOutcome(failed_count=0, lock=True)
    return SignInOutcome(failed_count=count, lock=False)
