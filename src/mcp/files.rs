//! MCP tools for files in a sandbox: read (paged for a model), write and
//! list, over the daemon's file endpoints.

use base64::Engine;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::CallToolResult;
use rmcp::{schemars, tool, tool_router, ErrorData};
use serde::Deserialize;
use serde_json::json;

use super::{answer, blocking, seg, CapsuleMcp};
use crate::api::files::{EntryInfo, Listing};

/// Most bytes one file_read returns.
const READ_PAGE: u64 = 64 << 10;
/// Entries file_list returns by default.
const LIST_DEFAULT: u64 = 1000;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ReadParams {
    /// The sandbox id.
    pub id: String,
    /// Absolute path of the file in the sandbox.
    pub path: String,
    /// Byte offset to read from (default 0).
    #[serde(default)]
    pub offset: u64,
    /// Bytes to read (default and most 65536).
    pub limit: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct WriteParams {
    /// The sandbox id.
    pub id: String,
    /// Absolute path of the file in the sandbox; missing parent
    /// directories are created.
    pub path: String,
    /// The file's content as text.
    pub content: Option<String>,
    /// Or its bytes in base64.
    pub content_b64: Option<String>,
    /// Permission bits in octal, e.g. `755` for a script (default: kept,
    /// or `644` for a new file).
    pub mode: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ListParams {
    /// The sandbox id.
    pub id: String,
    /// Absolute path of the directory.
    pub path: String,
    /// Most entries (default 1000, at most 100000).
    pub limit: Option<u64>,
}

fn files_url(id: &str, endpoint: &str, path: &str) -> String {
    format!(
        "/v1/sandboxes/{}/files{endpoint}?path={}",
        seg(id),
        seg(path)
    )
}

#[tool_router(router = files_router, vis = "pub(super)")]
impl CapsuleMcp {
    #[tool(
        description = "Read a file in a sandbox, at most 64 KiB per call: returns `content` (text) or `content_b64` (if it is not UTF-8), the file's `size`, and `next_offset` to pass as `offset` for the rest (null at the end)."
    )]
    async fn file_read(
        &self,
        Parameters(p): Parameters<ReadParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let limit = p.limit.unwrap_or(READ_PAGE).clamp(1, READ_PAGE);
        let url = format!(
            "{}&offset={}&length={limit}",
            files_url(&p.id, "", &p.path),
            p.offset
        );
        answer(
            blocking(move |api| {
                let mut data = Vec::new();
                let mut size = None;
                api.download(&url, &mut data, &mut |s| size = s, &mut |_| {})?;
                let end = p.offset + data.len() as u64;
                let more = size.is_some_and(|s| end < s);
                let mut out = json!({
                    "path": p.path, "size": size, "offset": p.offset,
                    "next_offset": more.then_some(end),
                });
                match String::from_utf8(data) {
                    Ok(text) => out["content"] = json!(text),
                    Err(e) => {
                        out["content_b64"] =
                            json!(base64::engine::general_purpose::STANDARD.encode(e.as_bytes()))
                    }
                }
                Ok(out)
            })
            .await,
        )
    }

    #[tool(
        description = "Write a file in a sandbox (replacing it whole), creating missing parent directories. Give `content` as text or `content_b64`. Returns what the file is now."
    )]
    async fn file_write(
        &self,
        Parameters(p): Parameters<WriteParams>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            blocking(move |api| {
                let data = match (p.content, p.content_b64) {
                    (Some(text), None) => text.into_bytes(),
                    (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map_err(|e| anyhow::anyhow!("content_b64 is not base64: {e}"))?,
                    _ => anyhow::bail!("give exactly one of content and content_b64"),
                };
                let mut url = files_url(&p.id, "", &p.path) + "&parents=true";
                if let Some(mode) = &p.mode {
                    url += &format!("&mode={}", seg(mode));
                }
                let info: EntryInfo =
                    api.upload(&url, Box::new(std::io::Cursor::new(data)), Box::new(|_| {}))?;
                Ok(serde_json::to_value(info)?)
            })
            .await,
        )
    }

    #[tool(
        description = "List a directory in a sandbox: each entry's name, type (file, dir, symlink), size, mode and modification time."
    )]
    async fn file_list(
        &self,
        Parameters(p): Parameters<ListParams>,
    ) -> Result<CallToolResult, ErrorData> {
        let limit = p.limit.unwrap_or(LIST_DEFAULT);
        let url = format!("{}&limit={limit}", files_url(&p.id, "/list", &p.path));
        answer(
            blocking(move |api| {
                let listing: Listing = api.call(hyper::Method::GET, &url, None)?;
                Ok(serde_json::to_value(listing)?)
            })
            .await,
        )
    }
}
