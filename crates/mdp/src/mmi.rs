//! MMI (ZeroMQ RFC 8): the broker's own `mmi.*` services and their status
//! codes, plus the extensions majordome answers.

/// Prefix of every service the broker answers itself.
pub const PREFIX: &[u8] = b"mmi.";
/// `mmi.service` with a service name: `200` when a live worker is there.
pub const SERVICE: &[u8] = b"mmi.service";
/// `mmi.services`: the names of services that have a worker, `", "`-joined.
pub const SERVICES: &[u8] = b"mmi.services";
/// `mmi.discovery` with a regular expression: the matching service names (RasPy).
pub const DISCOVERY: &[u8] = b"mmi.discovery";
/// `mmi.stats`: the broker's statistics as one JSON frame (majordome).
pub const STATS: &[u8] = b"mmi.stats";

/// The service exists (a worker is registered).
pub const OK: &[u8] = b"200";
/// The request was malformed (for example a bad regular expression).
pub const BAD_REQUEST: &[u8] = b"400";
/// No worker is registered for the service.
pub const NOT_FOUND: &[u8] = b"404";
/// The MMI service is not implemented.
pub const NOT_IMPLEMENTED: &[u8] = b"501";

/// True for names the broker keeps for itself.
pub fn is_internal(service: &[u8]) -> bool {
    service.starts_with(PREFIX)
}
