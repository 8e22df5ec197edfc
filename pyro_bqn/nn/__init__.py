"""Moment-aware neural-network layers."""
