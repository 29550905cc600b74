"""This app's typed keys. Imports only the domain layer: never backends or scheduler."""

from __future__ import annotations

from aiohttp import web

from imdsd.clock import Clock
from imdsd.imds.tree import TreeCache
from imdsd.inventory import Inventory
from imdsd.metrics import Metrics
from imdsd.model import Instance
from imdsd.sessions import SessionCache
from imdsd.tokens import TokenIssuer

INVENTORY = web.AppKey("inventory", Inventory)
SESSIONS = web.AppKey("sessions", SessionCache)
TOKENS = web.AppKey("tokens", TokenIssuer)
CLOCK = web.AppKey("clock", Clock)
TREES = web.AppKey("trees", TreeCache)
METRICS = web.AppKey("metrics", Metrics)
INSTANCE = web.RequestKey("instance", Instance)
