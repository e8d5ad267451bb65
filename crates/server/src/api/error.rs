//! Errors are responses: every failure becomes Key Vault's error body
//! `{"error":{"code","message","innererror"?}}`. Messages never carry secret values; internal
//! details go to the log, not to the client.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::vaults::ServiceError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub inner_code: Option<&'static str>,
    /// Set on 401s: the `WWW-Authenticate` challenge to send.
    pub challenge: Option<HeaderValue>,
    /// Set on 429s: seconds for `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), inner_code: None, challenge: None, retry_after: None }
    }

    /// Key Vault's 429 `Throttled`, with `Retry-After` (whole seconds, at least one).
    pub fn throttled(wait: std::time::Duration, message: impl FnOnce(u64) -> String) -> Self {
        let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        Self {
            retry_after: Some(secs),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "Throttled", message(secs))
        }
    }

    pub fn bad_parameter(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadParameter", message)
    }

    pub fn unauthorized(message: impl Into<String>, challenge: HeaderValue) -> Self {
        Self { challenge: Some(challenge), ..Self::new(StatusCode::UNAUTHORIZED, "Unauthorized", message) }
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "Forbidden", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "Conflict", message)
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "The HTTP method is not supported for this path.",
        )
    }

    pub fn internal(detail: &str) -> Self {
        tracing::error!(detail, "request failed with an internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "An internal error occurred; the server log has the details for this request id.",
        )
    }

    pub fn with_inner(mut self, inner: &'static str) -> Self {
        self.inner_code = Some(inner);
        self
    }

    /// Maps a service error for a request about the secret `subject` (a name or name/version).
    pub fn from_service(err: ServiceError, subject: &str) -> Self {
        match err {
            ServiceError::NotFound => Self::not_found(
                "SecretNotFound",
                format!(
                    "A secret with (name/id) {subject} was not found in this key vault. If you recently deleted \
                     this secret you may be able to recover it using the correct recovery command."
                ),
            ),
            ServiceError::Disabled => {
                Self::forbidden("Operation get is not allowed on a disabled secret.").with_inner("SecretDisabled")
            }
            ServiceError::NameDeleted => Self::conflict(format!(
                "Secret {subject} is currently in a deleted but recoverable state, and its name cannot be reused; \
                 in this state, the secret can only be recovered or purged."
            )),
            ServiceError::NameExists => Self::conflict(format!(
                "Secret {subject} already exists; restore does not overwrite. Delete and purge it first, or restore \
                 into another vault."
            )),
            ServiceError::Invalid(msg) => Self::bad_parameter(msg),
            ServiceError::PurgeProtected => Self::forbidden(
                "Operation \"purge\" is not allowed because purge protection is enabled for this vault. The secret \
                 is purged automatically after the retention period.",
            ),
            ServiceError::BadBackup => Self::bad_parameter(
                "Backup blob contains invalid or corrupt data, or was not made by this Coffer server.",
            ),
            ServiceError::VaultNotEmpty { .. } => Self::conflict(format!("{err}; pass force=true to delete it anyway.")),
            ServiceError::Internal(detail) => Self::internal(&detail),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(inner) = self.inner_code {
            error["innererror"] = json!({ "code": inner });
        }
        let mut response = (self.status, json_body(&json!({ "error": error }))).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        if let Some(challenge) = self.challenge {
            headers.insert(header::WWW_AUTHENTICATE, challenge);
        }
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

pub fn json_body(value: &serde_json::Value) -> String {
    value.to_string()
}
