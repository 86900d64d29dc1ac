//! actix-web extractors: `Authenticated(claims)` in a handler's arguments protects
//! the route; `WithMfa(claims)` also needs a second factor. Register the verifier with
//! `App::new().app_data(web::Data::new(verifier))`.
//!
//! Refusals follow RFC 6750: 401 with `WWW-Authenticate: Bearer error="invalid_token"`
//! and a JSON body `{"error","error_description"}`; 503 when keys or the revocation
//! state are unavailable. The reason is logged at debug level, never sent. A
//! [`StepUpRequired`] (from `WithMfa`, or `claims.require_recent_auth(..)?` in a handler)
//! answers RFC 9470's 401 `insufficient_user_authentication`, as Tessera does.

use std::future::Future;
use std::pin::Pin;

use actix_web::dev::Payload;
use actix_web::http::{StatusCode, header};
use actix_web::{FromRequest, HttpRequest, HttpResponse, ResponseError, web};

use crate::{Claims, StepUpRequired, Verifier, VerifyError};

/// The claims of the request's verified Bearer token.
pub struct Authenticated(pub Claims);

/// Why the extractor refused a request.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Rejection(pub VerifyError);

impl ResponseError for Rejection {
    fn status_code(&self) -> StatusCode {
        match self.0 {
            VerifyError::KeysUnavailable
            | VerifyError::RevocationUnavailable
            | VerifyError::Config(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let mut res = HttpResponse::build(status);
        res.insert_header((header::CACHE_CONTROL, "no-store"));
        let (error, description) = if status == StatusCode::UNAUTHORIZED {
            res.insert_header((header::WWW_AUTHENTICATE, r#"Bearer error="invalid_token""#));
            (
                "invalid_token",
                "access token is missing, invalid, expired or revoked",
            )
        } else {
            res.insert_header((header::RETRY_AFTER, "1"));
            (
                "temporarily_unavailable",
                "token verification is temporarily unavailable",
            )
        };
        res.json(serde_json::json!({"error": error, "error_description": description}))
    }
}

impl FromRequest for Authenticated {
    type Error = Rejection;
    type Future = Pin<Box<dyn Future<Output = Result<Self, Rejection>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let verifier = req.app_data::<web::Data<Verifier>>().cloned();
        let token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim().to_owned());
        Box::pin(async move {
            let verifier = verifier.ok_or_else(|| {
                Rejection(VerifyError::Config(
                    "no Verifier registered as app data".into(),
                ))
            })?;
            let token = token.ok_or(Rejection(VerifyError::Malformed))?;
            match verifier.verify(&token).await {
                Ok(claims) => Ok(Authenticated(claims)),
                Err(e) => {
                    tracing::debug!(reason = %e, "access token refused");
                    Err(Rejection(e))
                }
            }
        })
    }
}

impl ResponseError for StepUpRequired {
    fn status_code(&self) -> StatusCode {
        StatusCode::UNAUTHORIZED
    }

    fn error_response(&self) -> HttpResponse {
        let description = match self {
            StepUpRequired::MaxAge(_) => "this needs a recent authentication",
            StepUpRequired::Mfa => "this needs an authentication with a second factor",
        };
        HttpResponse::Unauthorized()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .insert_header((header::WWW_AUTHENTICATE, self.www_authenticate()))
            .json(serde_json::json!({
                "error": "insufficient_user_authentication",
                "error_description": description,
            }))
    }
}

/// The claims of a verified Bearer token whose user authenticated with a second factor
/// (`otp` in `amr`); a token without it gets RFC 9470's 401 with `acr_values="mfa"`.
pub struct WithMfa(pub Claims);

impl FromRequest for WithMfa {
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self, actix_web::Error>>>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let authenticated = Authenticated::from_request(req, payload);
        Box::pin(async move {
            let Authenticated(claims) = authenticated.await?;
            claims.require_mfa()?;
            Ok(WithMfa(claims))
        })
    }
}
