//! `/v1/events`: the event log, read in pages or followed live as
//! server-sent events. Each event has a sequence number; `after` resumes
//! where a reader left off, so a follower that reconnects misses nothing.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;

use super::error::{ApiError, ErrorBody};
use super::extract::Query;
use crate::daemon::AppState;
use crate::store::{Event, MAX_EVENTS_PER_READ};

#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Only events after this sequence number (default 0: from the start).
    pub after: Option<i64>,
    /// At most this many (default and most: 1000).
    #[param(minimum = 0, maximum = 1000)]
    pub limit: Option<u32>,
}

/// Events in order, oldest first.
#[utoipa::path(
    get, path = "/v1/events", operation_id = "list_events", tag = "events",
    params(EventsQuery),
    responses(
        (status = 200, description = "Events after `after`", body = [Event]),
        (status = 400, description = "Bad query", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Query(q): Query<EventsQuery>,
) -> Result<axum::Json<Vec<Event>>, ApiError> {
    if q.limit.is_some_and(|l| l > MAX_EVENTS_PER_READ) {
        return Err(ApiError::bad_request(format!(
            "limit is at most {MAX_EVENTS_PER_READ}"
        )));
    }
    let events = state
        .supervisor
        .store()
        .events_after(q.after.unwrap_or(0), q.limit.unwrap_or(MAX_EVENTS_PER_READ))?;
    Ok(axum::Json(events))
}

/// Follow events as they happen (`text/event-stream`): each SSE event's
/// id is its sequence number and its data the event as JSON.
#[utoipa::path(
    get, path = "/v1/events/stream", operation_id = "stream_events", tag = "events",
    params(EventsQuery),
    responses(
        (status = 200, description = "Server-sent events, each an Event as JSON",
         content_type = "text/event-stream", body = Event),
        (status = 400, description = "Bad query", body = ErrorBody),
    )
)]
pub async fn stream(
    State(state): State<Arc<AppState>>,
    Query(q): Query<EventsQuery>,
) -> Sse<impl tokio_stream::Stream<Item = Result<SseEvent, Infallible>>> {
    let mut after = q.after.unwrap_or(0);
    let stream = async_stream::stream! {
        loop {
            // Registered before reading, so a change between the read
            // and the wait still wakes us.
            let changed = state.supervisor.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let events = state.supervisor.store().events_after(after, MAX_EVENTS_PER_READ);
            match events {
                Ok(events) => {
                    for event in events {
                        after = event.seq;
                        let data = serde_json::to_string(&event).unwrap_or_default();
                        yield Ok(SseEvent::default().id(event.seq.to_string()).event(event.kind.clone()).data(data));
                    }
                }
                Err(e) => {
                    yield Ok(SseEvent::default().event("error").data(e.to_string()));
                    return;
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), changed).await;
        }
    };
    Sse::new(stream).keep_alive(KeepAlive::default())
}
