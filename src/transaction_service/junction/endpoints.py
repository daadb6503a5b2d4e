"""The Junction API endpoints the service uses, as templates: what errors, log lines and
synthesized bodies name (ids stay out of log lines)."""

GET_ORDER = "GET /v3/order/{order_id}"
GET_ORDER_TRANSACTION = "GET /v3/order_transaction/{transaction_id}"
GET_TRANSACTION_RESULTS = "GET /v3/order_transaction/{transaction_id}/result"
GET_TRANSACTION_RESULTS_PDF = "GET /v3/order_transaction/{transaction_id}/result/pdf"
LIST_ORDERS = "GET /v3/orders"
RESEND_EVENTS = "POST /v3/order/resend_events"
