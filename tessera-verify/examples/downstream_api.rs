//! A downstream API protected by Tessera access tokens.
//!
//! ```sh
//! TESSERA_ISSUER=http://127.0.0.1:8080 TESSERA_AUDIENCE=tessera \
//! REDIS_URL=redis://127.0.0.1:6379 TESSERA_REDIS_PREFIX=tessera: \
//!   cargo run -p tessera-verify --features actix --example downstream_api
//! curl -H "Authorization: Bearer $ACCESS_TOKEN" http://127.0.0.1:8090/hello
//! ```
//!
//! Without `REDIS_URL` tokens are checked by signature and claims only (a logged-out
//! token keeps working until it expires); with it, revocations reach the API at once.

use actix_web::{App, HttpResponse, HttpServer, web};
use tessera_verify::actix::{Authenticated, WithMfa};
use tessera_verify::{Config, RevocationConfig, Verifier};

/// Any route with `Authenticated` in its arguments needs a valid, unrevoked token.
async fn hello(Authenticated(claims): Authenticated) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "hello": claims.sub,
        "session": claims.sid,
        "roles": claims.roles,
    }))
}

/// `WithMfa` also needs a second factor: a token from a password-only login gets 401
/// `insufficient_user_authentication` (RFC 9470), and the client steps up at Tessera.
async fn payouts(WithMfa(claims): WithMfa) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"payouts_of": claims.sub}))
}

/// The API's routes, with the verifier as app data.
pub fn configure(verifier: Verifier) -> impl Fn(&mut web::ServiceConfig) + Clone {
    move |cfg| {
        cfg.app_data(web::Data::new(verifier.clone()))
            .route("/hello", web::get().to(hello))
            .route("/payouts", web::get().to(payouts));
    }
}

/// The example's configuration, from the environment.
pub fn config_from_env() -> Config {
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let mut config = Config::new(
        var("TESSERA_ISSUER", "http://127.0.0.1:8080"),
        var("TESSERA_AUDIENCE", "tessera"),
    );
    if let Ok(url) = std::env::var("REDIS_URL") {
        config.revocation = Some(RevocationConfig::new(
            url,
            var("TESSERA_REDIS_PREFIX", "tessera:"),
        ));
    }
    config
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let verifier = Verifier::new(config_from_env()).map_err(std::io::Error::other)?;
    let routes = configure(verifier);
    let address = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:8090".into());
    println!("downstream API on http://{address}/hello");
    HttpServer::new(move || App::new().configure(routes.clone()))
        .bind(address)?
        .run()
        .await
}
