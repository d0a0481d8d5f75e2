"""Air gap: offline switches and environment attestation (egress guard and wheel bundles to come)."""
