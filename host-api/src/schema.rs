//! The OpenAPI description of the forms and queries the API reads by hand
//! (multipart bodies are streamed, not deserialised): a submission's fields,
//! made from their one list ([`FIELDS`]), as the query parameters of
//! `POST /v1/jobs` and the forms of `POST /v1/jobs` and `POST /v1/batches`
//! (a field added there appears in all three); and a plugin upload's form.

use imgflow_platform::submission::{Field, FIELDS, IMAGE_FIELD};
use std::borrow::Cow;
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{
    ArrayBuilder, KnownFormat, ObjectBuilder, Schema, SchemaFormat, Type,
};
use utoipa::openapi::{RefOr, Required};
use utoipa::{IntoParams, PartialSchema, ToSchema};

/// A field's schema: text, with its description and example.
fn text(field: &Field) -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(field.about))
        .examples(field.example)
        .into()
}

/// An uploaded file's schema.
pub fn file(about: &str) -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
        .description(Some(about))
        .into()
}

/// A form: `files` first (required), then the fields `fields` keeps.
fn form(about: &str, files: (&str, Schema), keep: impl Fn(&Field) -> bool) -> RefOr<Schema> {
    let mut form = ObjectBuilder::new()
        .description(Some(about))
        .property(files.0, files.1)
        .required(files.0);
    for field in FIELDS.iter().filter(|f| keep(f)) {
        form = form.property(field.name, text(field));
    }
    RefOr::T(form.into())
}

/// The query of `POST /v1/jobs`: every field of [`FIELDS`].
pub struct SubmitQuery;

impl IntoParams for SubmitQuery {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        FIELDS
            .iter()
            .map(|field| {
                ParameterBuilder::new()
                    .name(field.name)
                    .parameter_in(ParameterIn::Query)
                    .required(Required::False)
                    .description(Some(format!(
                        "{} May be given in the query or as a form field: the same field twice, or in both places with different values, is refused (400) naming it.",
                        field.about
                    )))
                    .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
                    .example(field.example.map(serde_json::Value::from))
                    .build()
            })
            .collect()
    }
}

/// The form of `POST /v1/jobs`: one `image` and every field.
pub struct SubmitForm;

impl PartialSchema for SubmitForm {
    fn schema() -> RefOr<Schema> {
        form(
            "A job submitted as a form. Fields may also be given in the query.",
            (IMAGE_FIELD, file("The image: PNG, JPEG, WebP or GIF.")),
            |_| true,
        )
    }
}

impl ToSchema for SubmitForm {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("SubmitForm")
    }
}

/// The form of `POST /v1/batches`: `image` files and the fields a batch
/// takes.
pub struct BatchForm;

impl PartialSchema for BatchForm {
    fn schema() -> RefOr<Schema> {
        let images = ArrayBuilder::new()
            .items(RefOr::T(file("An image: PNG, JPEG, WebP or GIF.")))
            .description(Some(
                "The images, one `image` field each (at most `MAX_BATCH_IMAGES`).",
            ))
            .into();
        form(
            "A batch submitted as a form: the fields of `POST /v1/jobs` but `wait`.",
            (IMAGE_FIELD, images),
            |field| field.in_batch,
        )
    }
}

impl ToSchema for BatchForm {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("BatchForm")
    }
}

/// A plugin uploaded as a form: one file field (any name is taken).
pub struct UploadForm;

impl PartialSchema for UploadForm {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .description(Some("A plugin uploaded as a form."))
            .property("plugin", file("The component (any file field is taken)."))
            .required("plugin")
            .into()
    }
}

impl ToSchema for UploadForm {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("UploadForm")
    }
}
