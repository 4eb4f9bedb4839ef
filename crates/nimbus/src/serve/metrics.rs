//! Prometheus series of the HTTP front.

use super::activity::Expired;

/// `nimbus_http_connections` (gauge): client connections open.
pub const CONNECTIONS: &str = "nimbus_http_connections";
/// `nimbus_http_connections_refused_total`: connections answered 503
/// `too_many_connections` at the connection limit.
pub const REFUSED_TOTAL: &str = "nimbus_http_connections_refused_total";
/// `nimbus_http_connection_timeouts_total{timeout}` (`header|keepalive|stall`):
/// connections the server closed because a deadline passed.
pub const TIMEOUTS_TOTAL: &str = "nimbus_http_connection_timeouts_total";

/// Registers descriptions so `/metrics` documents each series, and the series at zero.
pub fn describe() {
    metrics::describe_gauge!(CONNECTIONS, "Client connections open.");
    metrics::describe_counter!(
        REFUSED_TOTAL,
        "Connections refused with 503 too_many_connections at the connection limit."
    );
    metrics::describe_counter!(
        TIMEOUTS_TOTAL,
        "Connections closed by the server because a timeout passed, by timeout."
    );
    metrics::gauge!(CONNECTIONS).set(0.0);
    metrics::counter!(REFUSED_TOTAL).absolute(0);
    for why in [Expired::Header, Expired::Keepalive, Expired::Stall] {
        metrics::counter!(TIMEOUTS_TOTAL, "timeout" => why.label()).absolute(0);
    }
}

/// One connection refused at the limit.
pub fn refused() {
    metrics::counter!(REFUSED_TOTAL).increment(1);
}

/// A connection opened.
pub fn connection_opened() {
    metrics::gauge!(CONNECTIONS).increment(1.0);
}

/// A connection closed.
pub fn connection_closed() {
    metrics::gauge!(CONNECTIONS).decrement(1.0);
}

/// One connection closed by a deadline.
pub fn timed_out(why: Expired) {
    metrics::counter!(TIMEOUTS_TOTAL, "timeout" => why.label()).increment(1);
}
