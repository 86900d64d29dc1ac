//! `GET /metrics` on the metrics listener (`metrics.listen`, never the API's port):
//! the counters kept in [`crate::metrics::Metrics`], and the gauges read now.

use actix_web::{HttpResponse, web};

use super::AppState;
use crate::metrics::{CONTENT_TYPE, Snapshot};

pub async fn scrape(state: web::Data<AppState>) -> HttpResponse {
    let auth = &state.auth;
    let pool = auth.store.pool_status();
    let signing = auth.tokens.keyring().current().signing.clone();
    let age = chrono::Utc::now() - signing.created_at;
    let text = auth.metrics.render(Snapshot {
        db_in_use: pool.in_use,
        db_idle: pool.idle,
        db_max: pool.max,
        signing_key_age_secs: age.num_milliseconds().max(0) as f64 / 1000.0,
    });
    HttpResponse::Ok().content_type(CONTENT_TYPE).body(text)
}
