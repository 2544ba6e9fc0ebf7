"""The candidates HTTP service (FastAPI): ``onetower serve``.

Status codes: 200; 404 for an unknown user with no state; 422 for bad parameters (k out of range,
a malformed filter or body); 503 when the vector store (or Redis, or the active version's encoder)
cannot serve. ``/healthz`` says the process runs, ``/readyz`` that it can answer, ``/metrics``
exposes Prometheus metrics, ``/docs`` and ``/openapi.json`` the OpenAPI description.

With ``settings.api_token`` set, the candidates routes need ``Authorization: Bearer <token>`` (401
otherwise); probes, metrics and the OpenAPI description stay open, for kubelets and scrapers (the
k8s NetworkPolicy decides who reaches the port).

No ``from __future__ import annotations`` here: FastAPI must see the k bound, a closure over settings.
"""

import logging
import secrets
import time
from typing import Annotated, Callable, Optional

import redis
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field

from indexer.candidates import CandidateResult, InvalidRequest, Retriever, ServiceUnavailable, UnknownUser
from core.errors import Unavailable
from indexer.filters import Filter, InvalidFilter, parse_filter
from indexer.vectors import MAX_TOPK
from models.errors import RenderError
from core.settings import Settings
from streams.events import EntityId, FeatureValue

log = logging.getLogger("onetower.api")
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Candidate(BaseModel):
    item_id: str
    score: float = Field(description="cosine similarity between the user and item vectors")


class CandidatesResponse(BaseModel):
    version: str = Field(description="the model version that produced every score")
    cold_start: bool = Field(description="the user vector was encoded on the fly from state, not read from the vector store")
    items: list[Candidate]

    @classmethod
    def of(cls, result: CandidateResult) -> "CandidatesResponse":
        return cls(version=result.version, cold_start=result.cold_start,
                   items=[Candidate(item_id=i, score=s) for i, s in result.items])


class CandidatesRequest(BaseModel):
    """A user the system has not seen, given by value."""

    features: dict[str, FeatureValue] = Field(default_factory=dict, description="profile features, e.g. age, occupation")
    history: list[EntityId] = Field(default_factory=list, max_length=1000, description="engaged item ids, oldest first")
    k: int = Field(default=100, ge=1, le=MAX_TOPK)
    exclude_seen: bool = Field(default=True, description="leave out the items in history")
    filter: Filter | None = Field(default=None, description='only items whose features pass it, e.g. '
                                                            '{"field": "year", "op": ">=", "value": 1990} (README: Filters)')


def bearer_auth(settings: Settings) -> Callable[..., None]:
    """A dependency that admits a request carrying ``settings.api_token`` (every request when it is
    empty); compared in constant time, so timing tells nothing about the token."""
    expected = settings.api_token.get_secret_value().encode()
    scheme = HTTPBearer(auto_error=False, description="settings.api_token")

    def check(credentials: Annotated[Optional[HTTPAuthorizationCredentials], Depends(scheme)]) -> None:
        if expected and not (credentials and secrets.compare_digest(credentials.credentials.encode(), expected)):
            raise HTTPException(status_code=401, detail="a valid bearer token is required",
                                headers={"WWW-Authenticate": "Bearer"})
    return check


def create_app(settings: Settings, retriever: Retriever | None = None) -> FastAPI:
    """The app over one Retriever; nothing connects until the first request (the store may start later)."""
    retriever = retriever or Retriever(settings)
    registry = CollectorRegistry()
    requests = Counter("onetower_http_requests", "HTTP requests by route and status", ["route", "status"], registry=registry)
    latency = Histogram("onetower_http_request_seconds", "HTTP request latency by route", ["route"],
                        buckets=LATENCY_BUCKETS, registry=registry)
    cold_starts = Counter("onetower_cold_start_users", "candidate requests that encoded the user on the fly", registry=registry)
    returned = Histogram("onetower_candidates_returned", "candidates returned per request",
                         buckets=(0, 1, 10, 50, 100, 500, 1000, 2000), registry=registry)

    app = FastAPI(title="onetower candidates", version="1",
                  description="Which items for this user, now? ANN over the active model version's item vectors.")

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = route.path if route is not None else "unmatched"
        latency.labels(path).observe(time.perf_counter() - start)
        requests.labels(path, str(response.status_code)).inc()
        return response

    def error(status: int):
        async def handler(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse(status_code=status, content={"detail": str(exc)})
        return handler

    async def unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        """What failed, for the client; where (server addresses) and why in full, for the server's log only."""
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse(status_code=503, content={"detail": exc.public})

    app.add_exception_handler(UnknownUser, error(404))
    for exc_type in (InvalidRequest, InvalidFilter, RenderError):  # RenderError: body features that cannot be rendered
        app.add_exception_handler(exc_type, error(422))
    app.add_exception_handler(Unavailable, unavailable)  # the vector store (IndexUnavailable), Redis or the encoder

    def respond(result: CandidateResult) -> CandidatesResponse:
        if result.cold_start:
            cold_starts.inc()
        returned.observe(len(result.items))
        return CandidatesResponse.of(result)

    authorized = [Depends(bearer_auth(settings))]

    @app.get("/v1/users/{user_id}/candidates", response_model=CandidatesResponse, dependencies=authorized,
             responses={401: {"description": "no valid bearer token (when api_token is set)"},
                        404: {"description": "unknown user with no state"}, 503: {"description": "the vector store is down"}})
    def user_candidates(
        user_id: Annotated[str, Path(min_length=1, max_length=128)],
        k: Annotated[int, Query(ge=1, le=settings.candidates_max_k)] = 100,
        exclude_seen: bool = True,
        filter: Annotated[str | None, Query(max_length=4096, description='a filter as JSON, as in the POST body, e.g. '
                                                                         '{"field":"year","op":">=","value":1990}')] = None,
    ) -> CandidatesResponse:
        """Top-k items for a known user (indexed, or encoded from Redis state on the fly)."""
        return respond(retriever.candidates(user_id, k, exclude_seen=exclude_seen,
                                            filter=parse_filter(filter) if filter else None))

    @app.post("/v1/candidates", response_model=CandidatesResponse, dependencies=authorized,
              responses={401: {"description": "no valid bearer token (when api_token is set)"},
                         503: {"description": "the vector store is down"}})
    def body_candidates(body: CandidatesRequest) -> CandidatesResponse:
        """Top-k items for a user given by features and history in the body."""
        return respond(retriever.candidates_for(body.features, body.history, body.k,
                                                exclude_seen=body.exclude_seen, filter=body.filter))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is up (no dependency is asked)."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "the vector store or Redis cannot serve, or no version is active"}})
    def readyz() -> dict[str, str]:
        """The vector store answers with an active version and Redis answers."""
        version = retriever.index.require_active()
        try:
            retriever.store.r.ping()
        except redis.RedisError as exc:
            raise ServiceUnavailable(f"Redis at {settings.redis_url_masked} failed: {exc}", public="Redis failed to answer") from None
        return {"status": "ready", "version": version}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
