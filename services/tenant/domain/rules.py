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
