// Same-origin calls to the daemon's REST API: the browser adds its Basic credentials itself.

export class ApiError extends Error {
  constructor(status, answer, path) {
    const words = answer && typeof answer === "object"
      ? [answer.Message, answer.Details].filter(Boolean).join(": ")
      : String(answer || "");
    super(words || `HTTP ${status} on ${path}`);
    this.status = status;
    this.answer = answer;
  }
}

export async function call(method, path, body) {
  const options = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const text = await response.text();
  let answer = null;
  if (text) {
    try { answer = JSON.parse(text); } catch { answer = text; }
  }
  if (!response.ok) throw new ApiError(response.status, answer, path);
  return answer;
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body === undefined ? {} : body);
