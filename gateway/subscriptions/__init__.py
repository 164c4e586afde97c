"""Topic-based subscriptions (R4 Subscriptions Backport IG)."""
