"""Who may scrape ``/metrics``: an admin token or a scrape token (``LABVIRT_METRICS_TOKENS``).

One rule for every process (API, gateway, workers, beat), so a scraper is configured with one
token for all of them. Series carry no session or user, but they tell how busy and how healthy
the system is: nothing for a learner's browser or the frontend (a frontend token is 403).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import Settings
from shared.credentials import matches_any, parse_bearer


@dataclass(frozen=True)
class Refusal:
    """Why a scrape is refused: an HTTP status, a problem code and its detail."""

    status: int
    code: str
    detail: str


def scrape_refusal(authorization: str | None, settings: Settings) -> Refusal | None:
    """None when the ``Authorization`` header may scrape, else why not."""
    token = parse_bearer(authorization or "")
    if token is None:
        return Refusal(401, "unauthorized", "scraping needs an admin token or a scrape token")
    # Every list is compared, so timing tells nothing of which one held the token.
    scraper = matches_any(token, settings.admin_tokens) | matches_any(
        token, settings.metrics_tokens
    )
    frontend = matches_any(token, settings.frontend_tokens)
    if scraper:
        return None
    if frontend:
        return Refusal(403, "forbidden", "a frontend token does not reach metrics")
    return Refusal(401, "unauthorized", "scraping needs an admin token or a scrape token")
