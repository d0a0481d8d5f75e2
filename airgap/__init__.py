"""Air gap: the egress guard (every job and the service), offline switches, environment attestation."""
