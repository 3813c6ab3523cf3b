"""Session and prefix KV blocks across device/host/disk tiers (lands with the KV-tier issue)."""
