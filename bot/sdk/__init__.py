"""The platform SDK: all an adapter uses of the bot (the Platform, live replies, access rules, its
settings' base, finding adapters by entry point)."""
