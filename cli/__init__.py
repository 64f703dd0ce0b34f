"""The `crm` command: local stack, service entry points and a client for the gateway."""
