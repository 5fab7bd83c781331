// Text chunks of a PNG file (tEXt, zTXt, iTXt), read in the browser so any PNG can be inspected.

const SIGNATURE = [137, 80, 78, 71, 13, 10, 26, 10];

export function isPng(bytes) {
  return SIGNATURE.every((b, i) => bytes[i] === b);
}

async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

const latin1 = new TextDecoder("latin1");
const utf8 = new TextDecoder("utf-8");

/** Split at the first NUL byte: [before, after]. */
function splitNul(bytes) {
  const nul = bytes.indexOf(0);
  return nul < 0 ? [bytes, new Uint8Array()] : [bytes.subarray(0, nul), bytes.subarray(nul + 1)];
}

async function decodeChunk(type, data) {
  const [keyBytes, rest] = splitNul(data);
  const key = latin1.decode(keyBytes);
  if (type === "tEXt") return [key, latin1.decode(rest)];
  if (type === "zTXt") return [key, latin1.decode(await inflate(rest.subarray(1)))];
  // iTXt: compression flag, method, language\0, translated keyword\0, UTF-8 text
  const compressed = rest[0] === 1;
  const [, afterLang] = splitNul(rest.subarray(2));
  const [, text] = splitNul(afterLang);
  return [key, utf8.decode(compressed ? await inflate(text) : text)];
}

/** {keyword: text} for every text chunk; null when the bytes are not a PNG. */
export async function readPngText(buffer) {
  const bytes = new Uint8Array(buffer);
  if (!isPng(bytes)) return null;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = {};
  let pos = 8;
  while (pos + 8 <= bytes.length) {
    const length = view.getUint32(pos);
    const type = latin1.decode(bytes.subarray(pos + 4, pos + 8));
    const data = bytes.subarray(pos + 8, Math.min(bytes.length, pos + 8 + length));
    if (type === "tEXt" || type === "zTXt" || type === "iTXt") {
      try {
        const [key, value] = await decodeChunk(type, data);
        out[key] = value;
      } catch {
        // a damaged chunk: skip it and keep reading the others
      }
    }
    if (type === "IEND") break;
    pos += 12 + length;
  }
  return out;
}
