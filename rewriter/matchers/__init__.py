"""Matchers shared by passes. A matcher has no side effects and returns None when it does not apply."""
