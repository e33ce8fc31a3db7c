"""The names of the functions server's Prometheus metrics: the contract between the app that exports them
(``prism.platform.metrics``) and the soak that reads them (``prism.checks.app_metrics``), kept in one place."""

__all__ = ["DATABASE_ERRORS", "DURATION", "FIRST_CALL", "LAST_CALL", "REQUESTS", "STARTED", "UNRECORDED"]

REQUESTS = "gatefill_function_requests"  # exposed as gatefill_function_requests_total{function,status}
DURATION = "gatefill_function_request_duration_seconds"  # histogram {function}
DATABASE_ERRORS = "gatefill_function_database_errors"  # _total{function}
UNRECORDED = "gatefill_function_unrecorded_errors"  # _total{function}: 5xx answers with no fn_logs event
FIRST_CALL = "gatefill_function_first_call_timestamp_seconds"  # {function}, on the server's clock
LAST_CALL = "gatefill_function_last_call_timestamp_seconds"  # {function}
STARTED = "gatefill_functions_server_start_time_seconds"  # Unix time the server (its supervisor) started
