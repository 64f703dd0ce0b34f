"""Core-entity service: accounts, contacts, leads, deals, pipelines and activities of one shard."""

SERVICE = "core_entity"
SCHEMA = "core"
