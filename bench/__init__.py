"""`make bench`: measures the suite against raw PostgreSQL baselines taken in the same run."""
