//! `axum::serve` on a portmux listener: the Rust twin of socketmaster's
//! `http.Serve(li, nil)`. SIGTERM or Ctrl-C shut it down gracefully: requests
//! in progress finish and keep-alive connections go back to portmux, for the
//! next instance.
//!
//! ```text
//! axum_hello SPEC [NAME]        e.g. axum_hello 'http://:8000/api' api
//! ```

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Uri;
use portmux_client::ConnInfo;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let spec = args.next().ok_or("usage: axum_hello SPEC [NAME]")?;
    let mut builder = portmux_client::Builder::new().route(spec);
    if let Some(name) = args.next() {
        builder = builder.name(name);
    }
    let listener = builder.bind_async().await?;
    for b in listener.routes() {
        println!("axum_hello: registered {} on {}", b.route, b.listen);
    }
    let app = Router::new().fallback(|ConnectInfo(info): ConnectInfo<ConnInfo>, uri: Uri| async move {
        format!("axum saw {uri} from {} via {}\n", info.peer, info.route)
    });
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            Some(_) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {}
        }
    };
    let graceful = listener.graceful().after(stop);
    axum::serve(listener, app.into_make_service_with_connect_info::<ConnInfo>())
        .with_graceful_shutdown(graceful)
        .await?;
    Ok(())
}
