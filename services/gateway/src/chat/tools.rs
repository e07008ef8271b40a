//! Tools in the DeepSeek-V4 prompt: the tools section of the system prompt, and assistant tool
//! calls written as DSML (`<｜DSML｜invoke name=…>` blocks with one `parameter` per argument).

use serde_json::Value;

use super::json::dumps;

pub const DSML: &str = "｜DSML｜";

/// The section appended to the system prompt; `schemas` are the tools' `function` objects.
pub fn render_tools(schemas: &[Value]) -> String {
    let schemas: Vec<String> = schemas.iter().map(dumps).collect();
    format!(
        "## Tools\n\n\
You have access to a set of tools to help answer the user's question. You can invoke tools by writing a \"<{DSML}tool_calls>\" block like the following:\n\n\
<{DSML}tool_calls>\n\
<{DSML}invoke name=\"$TOOL_NAME\">\n\
<{DSML}parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</{DSML}parameter>\n\
...\n\
</{DSML}invoke>\n\
<{DSML}invoke name=\"$TOOL_NAME2\">\n\
...\n\
</{DSML}invoke>\n\
</{DSML}tool_calls>\n\n\
String parameters should be specified as is and set `string=\"true\"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string=\"false\"`.\n\n\
If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\n\
Otherwise, output directly after </think> with tool calls or final response.\n\n\
### Available Tool Schemas\n\n\
{}\n\n\
You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n",
        schemas.join("\n")
    )
}

/// One call's arguments (a JSON object in a string) as DSML parameters. Arguments that are not
/// a JSON object travel as one string parameter named `arguments`, as the official encoder does.
fn render_arguments(arguments: &str) -> String {
    let parsed = match serde_json::from_str::<Value>(arguments) {
        Ok(Value::Object(map)) => map,
        _ => [("arguments".to_string(), Value::String(arguments.to_string()))].into_iter().collect(),
    };
    parsed
        .iter()
        .map(|(key, value)| {
            let (is_str, text) = match value {
                Value::String(s) => ("true", s.clone()),
                other => ("false", dumps(other)),
            };
            format!("<{DSML}parameter name=\"{key}\" string=\"{is_str}\">{text}</{DSML}parameter>")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The tool-calls block of an assistant turn (with its leading blank line).
pub fn render_tool_calls(calls: &[(String, String)]) -> String {
    let invokes: Vec<String> = calls
        .iter()
        .map(|(name, args)| format!("<{DSML}invoke name=\"{name}\">\n{}\n</{DSML}invoke>", render_arguments(args)))
        .collect();
    format!("\n\n<{DSML}tool_calls>\n{}\n</{DSML}tool_calls>", invokes.join("\n"))
}
