"""The project's common library: configuration, database access, events and the outbox, gRPC
bootstrap, errors and validation shared by every service and the gateway."""
