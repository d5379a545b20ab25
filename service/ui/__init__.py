"""The web console (`/ui`): server-rendered pages for on-call engineers, no build toolchain.

Jinja2 templates (`templates/`), htmx (`static/htmx.min.js`, 2.0.11, committed: nothing is fetched at install
or run time) for the live parts, and charts drawn as SVG on the server from the metrics table. It reads and
writes through the same crud functions as the API, with the same tokens: the login form stores the token in
an HTTP-only cookie, and every form that changes something carries a CSRF token bound to it (`auth.py`).
"""
