"""Topic-based subscriptions (FHIR R4 Subscriptions Backport IG 1.1.0).

May import: ``gateway.interactions`` (operation values; ADR 0001),
``gateway.events``, ``gateway.storage``, ``gateway.registry``, ``gateway.fhir``,
``gateway.settings``. No web framework (the websocket arrives as a plain
object with ``accept``/``receive_text``/``send_text``/``close``).
"""

from gateway.subscriptions.service import SubscriptionChecks, SubscriptionService
from gateway.subscriptions.topics import Topic, TopicRegistry

__all__ = ["SubscriptionChecks", "SubscriptionService", "Topic", "TopicRegistry"]
