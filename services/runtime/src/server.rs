//! What every sdlm gRPC server carries besides its own service: gRPC health
//! (`grpc.health.v1`), server reflection over the sdlm.v1 and health descriptors, a listener
//! bound before serving (so port 0 works and the real address is known), and a shutdown signal.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::server::HealthReporter;

/// The reflection service (v1) for every sdlm.v1 service and gRPC health.
pub fn reflection_service() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sdlm_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        // Both descriptor sets are compiled into the binary; they only fail to decode if the
        // build is broken, which every server start would show at once.
        .expect("the compiled descriptor sets decode")
}

/// The health service and its reporter; the process marks itself serving when ready.
pub fn health_service() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    tonic_health::server::health_reporter()
}

/// Accepted connections.
pub type Incoming =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = std::io::Result<TcpStream>> + Send>>;

/// A bound listener and the address it got.
pub struct Bound {
    pub addr: SocketAddr,
    pub incoming: Incoming,
}

/// Binds `addr` (port 0 picks a free port). Accepted connections have Nagle's algorithm off:
/// a committed block is a small message that must leave at once, not wait for an ACK.
pub async fn bind(addr: SocketAddr) -> std::io::Result<Bound> {
    use tokio_stream::StreamExt;
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let incoming = TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    });
    Ok(Bound {
        addr,
        incoming: Box::pin(incoming),
    })
}

/// Resolves when the process gets SIGTERM or SIGINT (Ctrl-C).
pub async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the process still stops on the default action.
        _ => std::future::pending::<()>().await,
    }
}
