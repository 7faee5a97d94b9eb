"""AuthorizationPolicy end-to-end tests (sandbox API server -> pilot -> xDS client / daemon)."""
