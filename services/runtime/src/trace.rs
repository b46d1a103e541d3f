//! Logging setup and W3C trace context (`traceparent`) carried in gRPC metadata from gateway to
//! scheduler to worker, so that one request's spans share a trace id across processes.

use std::fmt::Write;

use rand::Rng;
use tonic::metadata::MetadataMap;

/// The metadata key of W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// Logs to stderr, filtered by `SDLM_LOG` (default `info`), e.g. `SDLM_LOG=sdlm_scheduler=debug`.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SDLM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second initialisation (tests, `sdlm serve` after a library set one) keeps the first.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// A trace id and the id of the span that made the call (W3C trace context, version 00).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub sampled: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl TraceContext {
    /// A new trace (the gateway, when the client sent none).
    pub fn new_root() -> Self {
        let mut rng = rand::rng();
        Self {
            trace_id: rng.random(),
            parent_id: rng.random(),
            sampled: true,
        }
    }

    /// The same trace, called from a new span.
    pub fn child(&self) -> Self {
        Self {
            parent_id: rand::rng().random(),
            ..*self
        }
    }

    /// Parses a `traceparent` value; None for anything malformed or all-zero (the spec's
    /// invalid ids), so a bad header starts a new trace instead of failing the request.
    pub fn parse(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || parts.next().is_some() {
            return None;
        }
        let trace_id: [u8; 16] = unhex(trace)?;
        let parent_id: [u8; 8] = unhex(parent)?;
        let flags: [u8; 1] = unhex(flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            sampled: flags[0] & 1 == 1,
        })
    }

    pub fn from_metadata(metadata: &MetadataMap) -> Option<Self> {
        Self::parse(metadata.get(TRACEPARENT)?.to_str().ok()?)
    }

    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            u8::from(self.sampled)
        )
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// Writes this context into outgoing metadata.
    pub fn inject(&self, metadata: &mut MetadataMap) {
        if let Ok(value) = self.header().parse() {
            metadata.insert(TRACEPARENT, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TraceContext;

    #[test]
    fn a_traceparent_round_trips_and_children_keep_the_trace() {
        let root = TraceContext::new_root();
        let parsed = TraceContext::parse(&root.header()).expect("own header parses");
        assert_eq!(parsed, root);
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.parent_id, root.parent_id);
    }

    #[test]
    fn malformed_or_zero_traceparents_are_ignored() {
        // The example of the W3C recommendation parses.
        assert!(
            TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .is_some()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad:?} accepted");
        }
    }
}
