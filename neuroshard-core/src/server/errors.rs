//! Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}` with the
//! status codes OpenAI uses, so clients' error handling works unchanged.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An API error: the HTTP status and the body's fields.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) code: Option<&'static str>,
    pub(crate) param: Option<&'static str>,
    pub(crate) message: String,
}

impl ApiError {
    /// 400 `invalid_request_error`: a malformed or out-of-range request.
    pub(crate) fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            param,
            message: message.into(),
        }
    }

    /// 400: the body is not the JSON the endpoint takes.
    pub(crate) fn bad_json(detail: impl std::fmt::Display) -> Self {
        ApiError {
            code: Some("invalid_json"),
            ..ApiError::invalid(
                format!("the request body is not valid JSON for this endpoint: {detail}"),
                None,
            )
        }
    }

    /// 404 `model_not_found`.
    pub(crate) fn unknown_model(model: &str, served: &[String]) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model"),
            message: format!(
                "the model `{model}` does not exist; this server serves {}",
                served.join(", ")
            ),
        }
    }

    /// 400 `context_length_exceeded`.
    pub(crate) fn prompt_too_long(prompt: usize, context: usize) -> Self {
        ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                format!(
                    "the prompt has {prompt} tokens; this model's context is {context} tokens \
                     and needs room for at least one generated token"
                ),
                Some("messages"),
            )
        }
    }

    /// 401 `invalid_api_key`.
    pub(crate) fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "invalid_request_error",
            code: Some("invalid_api_key"),
            param: None,
            message: "missing or wrong API key: send `Authorization: Bearer <key>`".into(),
        }
    }

    /// 413: the body is over the server's limit.
    pub(crate) fn too_large(limit: usize) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: Some("request_too_large"),
            ..ApiError::invalid(format!("the request body is over {limit} bytes"), None)
        }
    }

    /// 429: every generation slot is busy.
    pub(crate) fn busy(limit: usize) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            code: Some("rate_limit_exceeded"),
            param: None,
            message: format!(
                "{limit} generations are running, the most this server runs at once; retry shortly"
            ),
        }
    }

    /// 503: the swarm cannot serve the request (no route, dead nodes).
    pub(crate) fn unavailable(detail: impl std::fmt::Display) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            code: Some("swarm_unavailable"),
            param: None,
            message: format!("the swarm cannot serve this request: {detail}"),
        }
    }

    /// 500: anything else.
    pub(crate) fn internal(detail: impl std::fmt::Display) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            code: None,
            param: None,
            message: detail.to_string(),
        }
    }

    /// A library error from a generation, as the client should see it.
    pub(crate) fn from_generation(error: crate::Error) -> Self {
        match error.kind() {
            crate::ErrorKind::BadInput
            | crate::ErrorKind::Generation
            | crate::ErrorKind::Tokenizer
            | crate::ErrorKind::TokenOutOfRange
            | crate::ErrorKind::SessionTooLong => ApiError::invalid(error.to_string(), None),
            crate::ErrorKind::Net => ApiError::unavailable(error),
            _ => ApiError::internal(error),
        }
    }

    /// The JSON body.
    pub(crate) fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}
