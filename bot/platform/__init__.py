"""The platform SDK: what an adapter builds on (finding adapters, live replies, access rules)."""
