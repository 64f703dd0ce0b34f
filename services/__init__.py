"""The suite's services, one package each, each owning its database schema."""
