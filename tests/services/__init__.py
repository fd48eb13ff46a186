"""Real services that the test harness starts on 127.0.0.1 (never assumed to be running)."""
