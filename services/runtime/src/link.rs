//! A gRPC client's transport: a network channel, or a server in this same process called
//! directly. `sdlm serve` links its gateway, scheduler and worker the second way: a request or
//! a committed block then crosses no HTTP/2 connection, socket or connection task between them
//! (on 2 cores each such hand-off is a thread wake-up on a core the engine is using), while every
//! hop still runs the same generated gRPC server code: its codec, metadata (trace context,
//! `grpc-timeout`), status codes and cancellation on drop.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::StdError;
use tonic::transport::Channel;
use tower::util::BoxCloneSyncService;
use tower::Service;

type Request = http::Request<Body>;
type Response = http::Response<Body>;

#[derive(Clone)]
pub enum Link {
    /// Dialled over the network.
    Net(Channel),
    /// A server in this process, called as a service.
    Local(BoxCloneSyncService<Request, Response, Infallible>),
}

impl Link {
    /// A link that calls `server` (a generated `…Server`) directly.
    pub fn local<S>(server: S) -> Self
    where
        S: Service<Request, Response = Response, Error = Infallible>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        Link::Local(BoxCloneSyncService::new(server))
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Net(_) => "Link::Net",
            Link::Local(_) => "Link::Local",
        })
    }
}

impl Service<Request> for Link {
    type Response = Response;
    type Error = StdError;
    type Future = Pin<Box<dyn Future<Output = Result<Response, StdError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StdError>> {
        match self {
            Link::Net(channel) => channel.poll_ready(cx).map_err(Into::into),
            Link::Local(server) => server.poll_ready(cx).map_err(|never| match never {}),
        }
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self {
            Link::Net(channel) => {
                let call = channel.call(request);
                Box::pin(async move { call.await.map_err(Into::into) })
            }
            Link::Local(server) => {
                let call = server.call(request);
                Box::pin(async move { call.await.map_err(|never| match never {}) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Link;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    #[tokio::test]
    async fn a_local_link_carries_answers_and_status_codes() {
        let (reporter, server) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("sdlm.v1.Worker", tonic_health::ServingStatus::Serving)
            .await;
        let mut client = HealthClient::new(Link::local(server));
        let ask = |service: &str| HealthCheckRequest {
            service: service.to_string(),
        };
        let answer = client.check(ask("sdlm.v1.Worker")).await.expect("known");
        assert_eq!(answer.into_inner().status(), ServingStatus::Serving);
        let unknown = client.check(ask("no.such.Service")).await;
        assert_eq!(
            unknown.expect_err("unknown service").code(),
            tonic::Code::NotFound
        );
    }
}
