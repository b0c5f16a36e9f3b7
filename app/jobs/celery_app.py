"""What the front end and the GPU workers agree on: the Celery app's settings, the task's name and the Redis keys.

Decisions:
- The broker is Redis, and its result backend the same Redis: besides Celery's own lists, the cancel flags,
  the attempt counters, the job -> task map and the workers' heartbeats are plain Redis keys, read and written
  by both sides with redis-py. Nothing else is shared: no disk, no database.
- JSON only, for messages and results (never pickle: a broker that someone else can write to must not be able
  to run code in a worker). Bytes travel as base64 text.
- A job runs on a worker that took it and acknowledges it only when it ends (acks_late); a worker process that
  dies mid-job hands the job back (reject_on_worker_lost), and Redis gives a job a worker took and never
  acknowledged (its whole worker was killed) to another after `visibility_timeout_s`. A job that stops every
  worker it meets is ended by the attempt counter, not run forever.
- Each worker runs one job at a time and takes the next only when it is free (prefork pool, concurrency 1,
  prefetch 1): a long job never holds a second one that another GPU could run.
- Celery and redis-py are imported inside the functions: they are the `cluster` extra, and the local backend
  never needs them.
"""

from __future__ import annotations

import functools
import re
from typing import Any
from urllib.parse import urlsplit

from app.config import ServiceSettings
from app.errors import EXIT_CONFIG, AppError

TASK_NAME = "i2v.generate"
QUEUE = "i2v"  # the jobs' Redis list; a name of its own, so another Celery app on the same Redis is not mixed in
KEY_PREFIX = "i2v:"
# Cancel flags, attempt counters and the job -> task map outlive any job: a week, then Redis drops them.
KEY_TTL_S = 7 * 24 * 3600
HEARTBEAT_S = 5.0  # a worker refreshes its heartbeat this often
HEARTBEAT_TTL_S = 15  # and is counted as gone when it has not for this long
CONNECT_TIMEOUT_S = 5.0  # a broker that does not answer a connection in this time is unreachable
COMMAND_TIMEOUT_S = 30.0  # nor a command in this time (a large result takes a moment to move)


def task_key(job_id: str) -> str:
    """The Celery task that runs job `job_id` now: set (only if unset) by the front end that sends it."""
    return f"{KEY_PREFIX}task:{job_id}"


def cancel_key(task_id: str) -> str:
    """Set when the task's job is cancelled; the worker checks it at every step."""
    return f"{KEY_PREFIX}cancel:{task_id}"


def attempts_key(task_id: str) -> str:
    """How many times a worker started the task (INCR at each start)."""
    return f"{KEY_PREFIX}attempts:{task_id}"


def collect_key(task_id: str) -> str:
    """Held by the front end that writes the task's video (two front ends on one queue never both write it)."""
    return f"{KEY_PREFIX}collect:{task_id}"


COLLECT_TTL_S = 600  # a front end that stopped while writing a video leaves it to another (or itself) after this


def worker_key(name: str) -> str:
    """A worker's heartbeat: its name, state and job, refreshed every HEARTBEAT_S seconds."""
    return f"{KEY_PREFIX}worker:{name}"


WORKER_KEYS = f"{KEY_PREFIX}worker:*"


def read_heartbeats(client: Any) -> list[dict]:
    """The connected workers' last heartbeats, read from Redis (`client`: a redis.Redis); an unreadable one is
    skipped (it is rewritten within HEARTBEAT_S)."""
    import json

    keys = list(client.scan_iter(match=WORKER_KEYS, count=100))
    beats = []
    for value in client.mget(keys) if keys else []:
        try:
            beats.append(json.loads(value))
        except (TypeError, ValueError):
            continue
    return beats


def new_task_id(job_id: str) -> str:
    """A task id for one sending of a job. A job sent again (retried after it failed or was cancelled) gets a
    new one: the workers keep revoked task ids for hours, and an old result must not pass for the new one."""
    import uuid

    return f"{job_id}-{uuid.uuid4().hex[:8]}"


def job_of_task(task_id: str) -> str:
    return task_id.rsplit("-", 1)[0]


def masked_url(url: str) -> str:
    """The broker URL with its password replaced by ***, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^@/]*@", "//***@", url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


class BrokerError(AppError):
    """The Redis broker cannot be reached, or refused us. A configuration problem: the message names the URL
    (without its password) and says what to check."""

    exit_code = EXIT_CONFIG


class ClusterMissingError(AppError):
    """Celery or redis-py is not installed (the `cluster` extra)."""

    exit_code = EXIT_CONFIG


def _require_cluster() -> None:
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        raise ClusterMissingError(
            f"The celery backend needs Celery and redis-py ({exc.name} is missing). Install them with: "
            "python -m pip install -e \".[cluster]\"",
            f"celery 后端需要 Celery 和 redis-py(缺少 {exc.name})。请运行:python -m pip install -e \".[cluster]\"",
        ) from None


def broker_error(url: str, exc: BaseException, who: str = "app") -> BrokerError:
    """The bilingual message for a broker that did not answer (or refused the password)."""
    shown = masked_url(url)
    reason = str(exc) or type(exc).__name__
    if "auth" in reason.lower() or "password" in reason.lower() or "NOAUTH" in reason:
        return BrokerError(
            f"The job broker at {shown} refused the password ({reason}). Put the right one in service.broker_url "
            "(redis://:PASSWORD@HOST:PORT/DB, or the variable I2V_SERVICE__BROKER_URL).",
            f"任务代理 {shown} 拒绝了密码({reason})。请在 service.broker_url 中填写正确的密码"
            "(redis://:密码@主机:端口/库,或使用环境变量 I2V_SERVICE__BROKER_URL)。")
    where = "the workers" if who == "app" else "the front end"
    where_zh = "各 worker" if who == "app" else "前端"
    return BrokerError(
        f"Cannot reach the job broker (Redis) at {shown}: {reason}. Start Redis there, or point "
        f"service.broker_url (or I2V_SERVICE__BROKER_URL) at the Redis server that {where} use; check the "
        "firewall and the password. See docs/scale-out.md.",
        f"无法连接任务代理(Redis){shown}:{reason}。请在该地址启动 Redis,或将 service.broker_url"
        f"(或环境变量 I2V_SERVICE__BROKER_URL)指向{where_zh}所用的 Redis 服务器;并检查防火墙和密码。"
        "详见 docs/scale-out.md。")


def redis_client(url: str) -> Any:
    """A redis-py client of the broker, with timeouts, so a broker that went away fails a call instead of
    hanging it."""
    _require_cluster()
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=COMMAND_TIMEOUT_S,
                                health_check_interval=30)


def check_broker(url: str, who: str = "app") -> Any:
    """A connected redis-py client of the broker, or BrokerError naming the URL (`who`: "app" for the front
    end, "worker" for a worker: the message names the other side)."""
    client = redis_client(url)
    try:
        client.ping()
    except Exception as exc:  # redis-py's ConnectionError, TimeoutError, AuthenticationError, ResponseError
        raise broker_error(url, exc, who) from None
    return client


def broker_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the broker cannot be reached now" (redis-py's, kombu's, and the socket's)."""
    _require_cluster()
    import kombu.exceptions
    import redis.exceptions

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, kombu.exceptions.OperationalError,
            OSError)


@functools.cache
def _polled_backend() -> type:
    from celery.backends.redis import RedisBackend

    class PolledRedisBackend(RedisBackend):
        """Celery's Redis result backend, without its subscription to each sent task's result channel. The
        front end polls every job's result with one MGET and never waits on one; subscribed, it would get each
        progress step and each finished video pushed to it as well, unread, until Redis cuts the connection off
        (its pub/sub buffer limit is 32 MB)."""

        def on_task_call(self, producer: Any, task_id: str) -> None:
            return None

    PolledRedisBackend.__module__ = __name__
    PolledRedisBackend.__qualname__ = "PolledRedisBackend"
    return PolledRedisBackend


def __getattr__(name: str) -> Any:
    # PolledRedisBackend is made on first use: its base class is Celery's, which only the cluster extra installs.
    if name == "PolledRedisBackend":
        return _polled_backend()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_celery(service: ServiceSettings) -> Any:
    """The Celery app both sides use (the worker registers the task on it; the front end sends by name)."""
    _require_cluster()
    from celery import Celery

    url = service.broker_url
    app = Celery("i2v", broker=url, backend=f"{__name__}:PolledRedisBackend+{url}", set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_track_started=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_pool="prefork",
        # The app logs through app.logging_setup; Celery must not replace its handlers.
        worker_hijack_root_logger=False,
        # A job whose worker lost the broker runs on: it is acknowledged when the broker is back.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=CONNECT_TIMEOUT_S,
        broker_transport_options={"visibility_timeout": service.visibility_timeout_s,
                                  "socket_connect_timeout": CONNECT_TIMEOUT_S},
        result_backend_transport_options={"visibility_timeout": service.visibility_timeout_s},
        redis_socket_connect_timeout=CONNECT_TIMEOUT_S,
        redis_socket_timeout=COMMAND_TIMEOUT_S,
        result_expires=service.result_expires_s,
        # A finished job's result waits for a broker that is briefly away instead of being lost (a few minutes).
        result_backend_always_retry=True,
        result_backend_max_retries=30,
        task_publish_retry=False,  # the front end sends again at its next round; it never blocks on a send
    )
    return app
