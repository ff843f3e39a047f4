"""The scrape layer: psycopg 3, version-aware SQL, one module per statistics source."""

from pgflow.scrape.scraper import Scraper, ScrapeStats, ServerInfo, scrape_once

__all__ = ["Scraper", "ScrapeStats", "ServerInfo", "scrape_once"]
