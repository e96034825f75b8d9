# The example app (examples/app.py) under gunicorn's gevent worker, configured by greenscope.
#
#   docker build -t greenscope-example .
#   docker run --rm -p 8000:8000 \
#       -e DATABASE_URL=postgresql+psycopg2://postgres@db.example:5432/app \
#       greenscope-example
#   curl http://127.0.0.1:8000/query
#
# Without DATABASE_URL the app uses an SQLite file in a temporary directory (a demo, not a
# deployment). WEB_CONCURRENCY sets the number of worker processes; POOL_SIZE the connections
# each worker's pool may open (workers x POOL_SIZE must fit the server's max_connections).

# A specific patch release of the slim image: rebuilds are reproducible, upgrades deliberate.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WEB_CONCURRENCY=2

WORKDIR /app

# The library first (changes rarely), with the extras the example needs: gunicorn + gevent,
# psycopg2 + psycogreen (psycopg2-binary ships its own libpq). greenscope is pure Python: no
# compiler is needed in the image.
COPY pyproject.toml README.md ./
COPY greenscope ./greenscope
RUN pip install ".[gunicorn,postgres]"

COPY examples ./examples

# Never run the server as root.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin greenscope
USER greenscope

EXPOSE 8000

# /stats answers without touching a session: it tells whether the worker serves, not whether
# the database is up (a database outage should not get every container restarted).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/stats', timeout=4).read()"]

# -k gevent: one greenlet per connection; -c python:greenscope.gunicorn: psycogreen and pool
# rebuild in each worker, registries emptied after fork; --preload: the app (and its engine) is
# imported once in the master, which greenscope.gunicorn makes safe in every worker.
CMD ["gunicorn", "-k", "gevent", "-c", "python:greenscope.gunicorn", "--preload", "--bind", "0.0.0.0:8000", "--pythonpath", "examples", "app:app"]
