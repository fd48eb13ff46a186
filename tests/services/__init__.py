"""Real services that the test harness starts on 127.0.0.1 (never assumed to be running).

The launchers live in `npo.devservices` (shared with `make services`); these modules only
re-export them for older imports."""
