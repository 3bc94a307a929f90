//! [`RouteTable`]: every route of the app is registered through it, and it keeps
//! the list of what it registered, so the OpenAPI test compares the document
//! with the routes the app really serves.
//!
//! Must not: hold handlers or decide anything about requests.

use actix_web::http::Method;
use actix_web::{web, FromRequest, Handler, Responder};

/// Registers routes on an actix `ServiceConfig` and remembers them.
pub(crate) struct RouteTable<'a> {
    cfg: &'a mut web::ServiceConfig,
    registered: Vec<(Method, String)>,
}

impl<'a> RouteTable<'a> {
    pub(crate) fn new(cfg: &'a mut web::ServiceConfig) -> Self {
        Self {
            cfg,
            registered: vec![],
        }
    }

    /// Serves `method path` (an actix pattern: `{name}`, `{name:regex}`) with `handler`.
    pub(crate) fn add<F, Args>(&mut self, method: Method, path: &str, handler: F) -> &mut Self
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        self.cfg
            .route(path, web::method(method.clone()).to(handler));
        self.registered.push((method, path.to_string()));
        self
    }

    /// `(method, actix pattern)` of every route registered, in order.
    pub(crate) fn registered(self) -> Vec<(Method, String)> {
        self.registered
    }
}
