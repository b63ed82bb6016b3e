// An attention view of the VGGT viewer: draws the value Python sends (vggt/viewer/payload.py) on
// canvases. Runs as the js_on_load of a gr.HTML, which provides `element`, `trigger`, `props` and
// `watch`. Strings from the export are only ever set with textContent, never as markup.
//
// Clicks: a click on a picker frame triggers "select" with {x, y} in frame pixels (Python finds the
// cell); a click on a composite cell triggers "select" with {layer, head} (Python opens it).

const FRAMES = (window.vggtFrames = window.vggtFrames || new Map()); // export -> Promise<images>
const VIEWS = (window.vggtViews = window.vggtViews || new Set()); // redraw(opacity) of every view
const REGISTERED = new WeakSet(); // the values whose frames were taken into FRAMES
window.vggtSetOpacity = (opacity) => VIEWS.forEach((redraw) => redraw(Number(opacity)));

const PICKER_HEIGHT = 250; // css pixels: the query frame and the overlays fit a 900 px high window
const root = element.querySelector(".av") || element;
let current = null; // the value drawn
let opacity = 0.6;
let page = 0; // page of columns (or frames) shown
let pageKey = "";

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function bytes(base64) {
  const text = atob(base64);
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

// The decoded frames of an export, shared by the views of the page: the first value after a Load
// carries them (one promise per frame, so that a view waits for its own frames only); views drawn
// before they arrive wait for them.
function framesEntry(key) {
  let entry = FRAMES.get(key);
  if (!entry) {
    let resolve;
    const promise = new Promise((done) => (resolve = done));
    entry = { promise, resolve };
    FRAMES.set(key, entry);
    while (FRAMES.size > 4) FRAMES.delete(FRAMES.keys().next().value);
  }
  return entry;
}

function decode(url) {
  return fetch(url).then((r) => r.blob()).then((b) => createImageBitmap(b)).catch(() => null);
}

// The frames in `needed` as an array indexed by frame (null where a frame could not be decoded).
async function frameImages(value, needed) {
  const entry = framesEntry(value.export);
  if (value.frames && !REGISTERED.has(value)) {
    REGISTERED.add(value); // a redraw of the same value (opacity, a page) decodes nothing again
    const decoding = value.frames.map(decode);
    entry.resolve(decoding);
    FRAMES.set(value.export, { promise: Promise.resolve(decoding), resolve: () => {} });
  }
  const decoding = await entry.promise;
  const images = [];
  await Promise.all([...needed].map(async (frame) => { images[frame] = await decoding[frame]; }));
  return images;
}

// The map of one cell as a tiny canvas: one pixel per grid cell, jet colour, alpha = code x opacity.
function mapCanvas(codes, value, lut) {
  const { rows, cols } = value.grid;
  const canvas = document.createElement("canvas");
  canvas.width = cols;
  canvas.height = rows;
  const context = canvas.getContext("2d");
  const image = context.createImageData(cols, rows);
  const data = image.data;
  for (let i = 0; i < rows * cols; i++) {
    const k = codes[i];
    data[4 * i] = lut[3 * k];
    data[4 * i + 1] = lut[3 * k + 1];
    data[4 * i + 2] = lut[3 * k + 2];
    data[4 * i + 3] = Math.round(k * opacity);
  }
  context.putImageData(image, 0, 0);
  return canvas;
}

// Outline grid cell [r, c] (scale: canvas pixels per frame pixel).
function outlineCell(context, value, cell, scale, colour, fill) {
  const [cw, ch] = value.grid.cell;
  const [w, h] = value.size;
  const x0 = cell[1] * cw * scale;
  const y0 = cell[0] * ch * scale;
  const x1 = Math.min((cell[1] + 1) * cw, w) * scale;
  const y1 = Math.min((cell[0] + 1) * ch, h) * scale;
  if (fill) {
    context.fillStyle = fill;
    context.fillRect(x0, y0, x1 - x0, y1 - y0);
  }
  const thickness = Math.max(1, Math.min(2 * Math.ceil(scale), (x1 - x0) / 4, (y1 - y0) / 4));
  context.lineWidth = thickness;
  context.strokeStyle = colour;
  context.strokeRect(x0 + thickness / 2, y0 + thickness / 2, x1 - x0 - thickness, y1 - y0 - thickness);
}

function drawMarker(context, marker, scale) {
  const x = (marker.x + 0.5) * scale;
  const y = (marker.y + 0.5) * scale;
  const r = Math.max(4, 5 * scale);
  context.lineWidth = Math.max(2, scale);
  context.strokeStyle = marker.color;
  context.beginPath();
  if (marker.shape === "circle") context.arc(x, y, r, 0, 2 * Math.PI);
  else if (marker.shape === "square") context.rect(x - r, y - r, 2 * r, 2 * r);
  else {
    context.moveTo(x - r, y - r);
    context.lineTo(x + r, y + r);
    context.moveTo(x + r, y - r);
    context.lineTo(x - r, y + r);
  }
  context.stroke();
}

// A canvas holding a frame, its map (if any), the outlined cell and the markers. `scale` is canvas
// pixels per frame pixel: an integer where the view must be exact (frames), any where it is small.
function drawCell(canvas, image, cell, value, lut, scale) {
  const [w, h] = value.size;
  canvas.width = Math.round(w * scale);
  canvas.height = Math.round(h * scale);
  canvas.dataset.scale = String(scale);
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = scale < 1;
  if (image) context.drawImage(image, 0, 0, canvas.width, canvas.height);
  if (cell.codes) {
    const { rows, cols, cell: size } = value.grid;
    context.imageSmoothingEnabled = false;
    const map = mapCanvas(bytes(cell.codes), value, lut);
    context.drawImage(map, 0, 0, cols * size[0] * scale, rows * size[1] * scale);
  }
  if (cell.outline) outlineCell(context, value, cell.outline, scale, "#ffffff");
  for (const marker of cell.markers || []) drawMarker(context, marker, scale);
}

// Canvas pixels per frame pixel for a canvas shown `cssWidth` wide.
function backingScale(value, cssWidth, exact) {
  const wanted = (cssWidth * (window.devicePixelRatio || 1)) / value.size[0];
  return exact ? Math.max(1, Math.ceil(wanted)) : Math.min(Math.max(wanted, 0.05), 4);
}

function drawPicker(container, value, images, lut) {
  const picker = value.picker;
  const box = el("div", "av-picker");
  const canvas = el("canvas", "av-picker-canvas");
  canvas.dataset.frame = String(picker.frame);
  const [w, h] = value.size;
  const cssWidth = Math.min((root.clientWidth || 640) / 2, (PICKER_HEIGHT * w) / h);
  canvas.style.width = `${cssWidth}px`;
  const scale = backingScale(value, cssWidth, true);
  drawCell(canvas, images && images[picker.frame], { codes: null }, value, lut, scale);
  const context = canvas.getContext("2d");
  context.strokeStyle = "rgba(0, 255, 0, 0.45)";
  context.lineWidth = 1;
  const [cw, ch] = value.grid.cell;
  context.beginPath();
  for (let c = 1; c < value.grid.cols; c++) {
    context.moveTo(c * cw * scale + 0.5, 0);
    context.lineTo(c * cw * scale + 0.5, canvas.height);
  }
  for (let r = 1; r < value.grid.rows; r++) {
    context.moveTo(0, r * ch * scale + 0.5);
    context.lineTo(canvas.width, r * ch * scale + 0.5);
  }
  context.stroke();
  if (picker.cell) outlineCell(context, value, picker.cell, scale, "#ff0000", "rgba(255, 230, 0, 0.55)");
  canvas.addEventListener("click", (event) => {
    const rect = canvas.getBoundingClientRect();
    const x = ((event.clientX - rect.left) / rect.width) * w;
    const y = ((event.clientY - rect.top) / rect.height) * h;
    trigger("select", { x, y });
  });
  box.appendChild(canvas);
  box.appendChild(el("div", "av-caption", picker.caption));
  container.appendChild(box);
  return (cssWidth * h) / w + 20; // its height in css pixels, with its caption
}

function drawColorbar(container, value, lut) {
  const bar = el("div", "av-colorbar");
  const canvas = el("canvas", "av-colorbar-canvas");
  canvas.width = 256;
  canvas.height = 1;
  const context = canvas.getContext("2d");
  const image = context.createImageData(256, 1);
  for (let k = 0; k < 256; k++) {
    image.data.set([lut[3 * k], lut[3 * k + 1], lut[3 * k + 2], 255], 4 * k);
  }
  context.putImageData(image, 0, 0);
  bar.appendChild(el("span", "av-tick", "0"));
  bar.appendChild(canvas);
  const top = value.colorbar.max;
  bar.appendChild(el("span", "av-tick", top === null ? "full colour" : Number(top).toPrecision(3)));
  bar.appendChild(el("span", "av-colorbar-text", top === null ? value.colorbar.text : "probability"));
  container.appendChild(bar);
}

// The readout: lines of text, then notes on the export. Beside a picker it is as high as the picker
// (the overlays below stay in the window); its lines scroll when they need more, the notes stay shown.
function readout(container, lines, notes, height) {
  const box = el("div", "av-readout");
  const body = el("div", "av-lines");
  for (const line of lines || []) body.appendChild(el("div", "av-line", line));
  box.appendChild(body);
  for (const line of notes || []) box.appendChild(el("div", "av-note", line));
  if (height) box.style.maxHeight = `${height}px`;
  container.appendChild(box);
}

// Layout of the grid: which columns are on the current page and how wide a cell is.
function layout(value, width) {
  const view = value.view;
  const columns = view.columns.length;
  const labelled = view.mode !== "frames" || view.rows.length > 1;
  if (!labelled) {
    // frames: up to 4 side by side, more in pages of 2 rows of 4, fitted to the window's height
    const perPage = columns <= 4 ? columns : 8;
    const perRow = Math.min(columns, 4);
    const rowsPerPage = Math.ceil(perPage / perRow);
    // the main overlays fit below the query frame; a view further down (a tab) fits the window itself
    const top = root.getBoundingClientRect().top + window.scrollY;
    const above = top < window.innerHeight ? top : 120;
    const aspect = value.size[1] / value.size[0];
    const widest = (width - 10 * (perRow - 1)) / perRow;
    // room for the captions too: their lines at the cell's width (about 6.5 px a character)
    const longest = Math.max(0, ...view.rows[0].cells.map((cell) => (cell ? cell.caption.length : 0)));
    let cell = widest;
    for (let pass = 0; pass < 2; pass++) {
      const lines = Math.max(1, Math.ceil((longest * 6.5) / cell));
      const height = Math.max(200, window.innerHeight - above - 42 - 16 * lines * rowsPerPage);
      cell = Math.min(widest, height / rowsPerPage / aspect);
    }
    return { labelled, perPage, perRow, cell: Math.floor(cell), label: 0 };
  }
  const label = Math.min(170, Math.max(110, width * 0.12));
  const perPage = Math.max(1, Math.min(columns, Math.floor((width - label) / 168)));
  const cell = Math.min(260, Math.floor((width - label - 8 * perPage) / perPage));
  return { labelled, perPage, perRow: perPage, cell, label };
}

// The columns of the grid on the current page.
function pageOf(value) {
  const view = value.view;
  const width = root.clientWidth || 1000;
  const shape = layout(value, width);
  const columns = view.columns.length;
  const pages = Math.max(1, Math.ceil(columns / shape.perPage));
  const key = `${value.export}|${view.mode}|${columns}`;
  if (key !== pageKey) {
    page = 0;
    pageKey = key;
  }
  page = Math.min(page, pages - 1);
  const first = page * shape.perPage;
  const shown = [...Array(Math.min(shape.perPage, columns - first)).keys()].map((i) => first + i);
  return { shape, columns, pages, first, shown };
}

// The frames a value draws on this page.
function neededFrames(value) {
  const needed = new Set();
  if (value.picker) needed.add(value.picker.frame);
  if (value.view) {
    const { shown } = pageOf(value);
    for (const row of value.view.rows) {
      for (const column of shown) if (row.cells[column]) needed.add(row.cells[column].frame);
    }
  }
  return needed;
}

function drawGrid(container, value, images, lut) {
  const view = value.view;
  const { shape, columns, pages, first, shown } = pageOf(value);

  const head = el("div", "av-head");
  drawColorbar(head, value, lut);
  if (pages > 1) {
    const pager = el("div", "av-pager");
    const back = el("button", "av-page-button", "◀");
    const next = el("button", "av-page-button", "▶");
    back.disabled = page === 0;
    next.disabled = page === pages - 1;
    back.addEventListener("click", () => { page -= 1; redraw(); });
    next.addEventListener("click", () => { page += 1; redraw(); });
    const what = view.mode === "layers_heads" ? "columns" : "frames";
    pager.append(back, el("span", "av-page-text",
      `${what} ${first + 1}–${first + shown.length} of ${columns}`), next);
    head.appendChild(pager);
  }
  container.appendChild(head);

  const grid = el("div", "av-grid");
  const template = `repeat(${shape.perRow}, ${shape.cell}px)`;
  grid.style.gridTemplateColumns = shape.labelled ? `${shape.label}px ${template}` : template;
  if (shape.labelled) {
    grid.appendChild(el("div", "av-corner"));
    for (const column of shown) grid.appendChild(el("div", "av-column", view.columns[column]));
  }
  const exact = !shape.labelled;
  const scale = backingScale(value, shape.cell, exact);
  for (const row of view.rows) {
    if (shape.labelled) {
      const label = el("div", "av-label");
      label.appendChild(el("div", "av-label-name", row.label));
      if (row.note) label.appendChild(el("div", "av-label-note", row.note));
      grid.appendChild(label);
    }
    for (const column of shown) {
      const cell = row.cells[column];
      const box = el("div", "av-cell");
      if (cell) {
        const canvas = el("canvas", "av-canvas");
        canvas.style.width = `${shape.cell}px`;
        canvas.dataset.frame = String(cell.frame);
        drawCell(canvas, images && images[cell.frame], cell, value, lut, scale);
        box.appendChild(canvas);
        if (!shape.labelled) box.appendChild(el("div", "av-caption", cell.caption));
        if (cell.opens) {
          box.classList.add("av-opens");
          box.title = `open ${row.label} · ${view.columns[column]} in the frames view`;
          box.addEventListener("click", () => trigger("select", cell.opens));
        }
      }
      grid.appendChild(box);
    }
  }
  container.appendChild(grid);
}

async function draw(value) {
  const images = value.export ? await frameImages(value, neededFrames(value)) : null;
  if (value !== current) return; // a newer value arrived while the frames decoded
  const lut = value.lut ? bytes(value.lut) : null;
  const container = el("div", "av-body");
  if (value.empty) container.appendChild(el("div", "av-empty", value.empty));
  if (value.picker) {
    const top = el("div", "av-top");
    const height = drawPicker(top, value, images, lut);
    readout(top, value.readout, value.notes, height);
    container.appendChild(top);
  } else if (value.readout) {
    readout(container, value.readout, value.notes);
  }
  if (value.view) drawGrid(container, value, images, lut);
  root.replaceChildren(container);
  requestAnimationFrame(() => {
    root.dataset.drawn = String(value.seq);
    root.dataset.drawnAt = String(performance.now());
  });
}

function redraw() {
  if (current) draw(current);
}

function show(value) {
  if (!value || typeof value !== "object" || !value.seq) return;
  current = value;
  if (typeof value.opacity === "number") opacity = value.opacity;
  draw(value);
}

VIEWS.add((value) => {
  if (!root.isConnected) return;
  opacity = value;
  redraw();
});
watch("value", () => show(props.value));
show(props.value);
