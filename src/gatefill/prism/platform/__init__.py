"""The PRISM platform stand-in: the edge functions over HTTP, their server-side library and Postgres driver."""
