"""Small WSGI applications that the tests run under real servers (gunicorn)."""
