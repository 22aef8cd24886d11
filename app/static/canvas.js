// Labeling canvas for the trex2 app: the body of gr.HTML's js_on_load.
// Gradio provides: element (this component's root), trigger(event, data), props (props.value
// is the view sent by Python), watch(prop, callback).
// Python -> JS: props.value = {seq, image: {url, width, height, file, index, count, status},
//   classes: [{name, color}], active_class, threshold, prompts: [{id, cls, kind, coords,
//   negative}], boxes: [{id, cls, xyxy, score, state, source}], message, action}.
// JS -> Python: trigger('op', {op, ...}) with op one of add_prompt, add_box, move, delete,
//   accept, reject, relabel, set_class, negative, promote (a box becomes a prompt), select,
//   goto (index: the image to show),
//   and file (the image it was made on).
//   Coordinates are pixels of the original (EXIF-corrected) image; the preview may be smaller.
const root = element.querySelector('.tx-wrap');
const stage = root.querySelector('.tx-stage');
const canvas = root.querySelector('.tx-canvas');
const ctx = canvas.getContext('2d');
const negBox = root.querySelector('.tx-neg');
const img = new Image();
let view = null;
let imgUrl = null;
let imgReady = false;
let tool = 'box';
let selected = null;          // {type: 'prompt' | 'box', id}
let drag = null;              // current mouse gesture
let local = null;             // optimistic shape drawn until Python answers
let xf = {s: 1, ox: 0, oy: 0, fitted: true};  // css px = image px * s + offset
let spaceDown = false;
let overStage = false;        // pointer over the image: Space pans (not a focused button)
const HANDLE = 6;             // handle half-size, css px
const api = window.trexCanvas = window.trexCanvas || {};
api.renders = api.renders || 0;

function clickButton(id) { const b = document.getElementById(id); if (b) b.click(); }
function colorOf(cls) {
  const c = view && view.classes.find(k => k.name === cls);
  return c ? c.color : '#ffffff';
}
function isVisible(b) {
  if (b.state === 'accepted') return true;
  if (b.state === 'rejected') return false;
  return b.score === null || b.score >= view.threshold;
}
function items() {
  if (!view || !view.image) return [];
  const out = [];
  for (const p of view.prompts) out.push({type: 'prompt', rec: p});
  for (const b of view.boxes) if (isVisible(b)) out.push({type: 'box', rec: b});
  return out;
}
function shapeOf(it) {  // -> {kind: 'box', xyxy} | {kind: 'point', xy}
  if (it.type === 'box') return {kind: 'box', xyxy: it.rec.xyxy};
  return it.rec.kind === 'point' ? {kind: 'point', xy: it.rec.coords} : {kind: 'box', xyxy: it.rec.coords};
}
function findSelected() {
  if (!selected) return null;
  return items().find(it => it.type === selected.type && it.rec.id === selected.id) || null;
}

// ---------------------------------------------------------------- geometry
function fit() {
  if (!view || !view.image) return;
  const W = view.image.width, H = view.image.height;
  const sw = stage.clientWidth, sh = stage.clientHeight;
  const m = 12;  // margin, so handles on the image border can be grabbed
  const s = Math.max(Math.min((sw - 2 * m) / W, (sh - 2 * m) / H), 0.01);
  xf = {s: s, ox: (sw - W * s) / 2, oy: (sh - H * s) / 2, fitted: true};
}
function toImg(e) {
  const r = canvas.getBoundingClientRect();
  return [(e.clientX - r.left - xf.ox) / xf.s, (e.clientY - r.top - xf.oy) / xf.s];
}
function toCss(x, y) { return [x * xf.s + xf.ox, y * xf.s + xf.oy]; }
function clampPt(p) {
  const W = view.image.width, H = view.image.height;
  return [Math.min(Math.max(p[0], 0), W), Math.min(Math.max(p[1], 0), H)];
}
function handles(xyxy) {  // 8 resize handles: [name, x, y] in image px
  const [x1, y1, x2, y2] = xyxy, mx = (x1 + x2) / 2, my = (y1 + y2) / 2;
  return [['nw', x1, y1], ['n', mx, y1], ['ne', x2, y1], ['e', x2, my],
          ['se', x2, y2], ['s', mx, y2], ['sw', x1, y2], ['w', x1, my]];
}
function hitHandle(it, p) {
  const sh = shapeOf(it);
  if (sh.kind !== 'box') return null;
  const tol = (HANDLE + 2) / xf.s;
  for (const [name, x, y] of handles(sh.xyxy)) {
    if (Math.abs(p[0] - x) <= tol && Math.abs(p[1] - y) <= tol) return name;
  }
  return null;
}
function hitTest(p) {  // topmost item under p: points first, then the smallest box
  let best = null, bestArea = Infinity;
  const tol = 8 / xf.s;
  for (const it of items()) {
    const sh = shapeOf(it);
    if (sh.kind === 'point') {
      if (Math.hypot(p[0] - sh.xy[0], p[1] - sh.xy[1]) <= tol) return it;
      continue;
    }
    const [x1, y1, x2, y2] = sh.xyxy;
    if (p[0] >= x1 - tol && p[0] <= x2 + tol && p[1] >= y1 - tol && p[1] <= y2 + tol) {
      const a = (x2 - x1) * (y2 - y1);
      if (a < bestArea) { best = it; bestArea = a; }
    }
  }
  return best;
}

// ---------------------------------------------------------------- drawing
function layout() {
  const dpr = window.devicePixelRatio || 1;
  const w = stage.clientWidth, h = stage.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
    canvas.style.width = w + 'px';
    canvas.style.height = h + 'px';
  }
  if (xf.fitted) fit();
}
let labelRects = [];  // labels drawn in this frame, to keep new ones off them
function overlaps(a) {
  return labelRects.some(b => a[0] < b[0] + b[2] && b[0] < a[0] + a[2] && a[1] < b[1] + b[3] && b[1] < a[1] + a[3]);
}
function label(text, x, y, color) {
  ctx.font = '12px system-ui, sans-serif';
  const w = ctx.measureText(text).width + 6;
  let ty = y - 16 < 0 ? y : y - 16;
  if (overlaps([x, ty, w, 16])) ty = y;         // above is taken: inside the box's top edge
  if (overlaps([x, ty, w, 16])) ty = y + 16;
  labelRects.push([x, ty, w, 16]);
  ctx.fillStyle = color;
  ctx.fillRect(x, ty, w, 16);
  ctx.fillStyle = '#000';
  ctx.fillText(text, x + 3, ty + 12);
}
function drawBoxShape(xyxy, color, opts) {
  const [a, b] = toCss(xyxy[0], xyxy[1]);
  const [c, d] = toCss(xyxy[2], xyxy[3]);
  ctx.save();
  ctx.setLineDash(opts.dash || []);
  ctx.lineWidth = opts.width || 2;
  ctx.strokeStyle = color;
  if (opts.fill) { ctx.fillStyle = opts.fill; ctx.fillRect(a, b, c - a, d - b); }
  ctx.strokeRect(a, b, c - a, d - b);
  if (opts.cross) {
    ctx.beginPath(); ctx.moveTo(a, b); ctx.lineTo(c, d); ctx.moveTo(c, b); ctx.lineTo(a, d); ctx.stroke();
  }
  ctx.restore();
  if (opts.text) label(opts.text, a, b, color);
  if (opts.selected) {
    ctx.fillStyle = '#fff';
    ctx.strokeStyle = '#000';
    ctx.lineWidth = 1;
    for (const [, x, y] of handles(xyxy)) {
      const [hx, hy] = toCss(x, y);
      ctx.fillRect(hx - HANDLE / 2, hy - HANDLE / 2, HANDLE, HANDLE);
      ctx.strokeRect(hx - HANDLE / 2, hy - HANDLE / 2, HANDLE, HANDLE);
    }
  }
}
function drawPoint(xy, color, negative, isSel) {
  const [x, y] = toCss(xy[0], xy[1]);
  ctx.beginPath();
  ctx.arc(x, y, isSel ? 8 : 6, 0, 2 * Math.PI);
  ctx.fillStyle = negative ? '#d00' : color;
  ctx.fill();
  ctx.lineWidth = 2;
  ctx.strokeStyle = '#fff';
  ctx.stroke();
  ctx.beginPath();
  ctx.moveTo(x - 3, y); ctx.lineTo(x + 3, y);
  if (!negative) { ctx.moveTo(x, y - 3); ctx.lineTo(x, y + 3); }
  ctx.stroke();
}
function render() {
  layout();
  const dpr = window.devicePixelRatio || 1;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  labelRects = [];
  let nVisible = 0;
  if (!view || !view.image) {
    ctx.fillStyle = '#ccc';
    ctx.font = '16px system-ui, sans-serif';
    ctx.fillText((view && view.message) || 'No image', 20, 30);
  } else {
    const W = view.image.width, H = view.image.height;
    if (imgReady) {
      ctx.imageSmoothingEnabled = xf.s < 2;
      ctx.drawImage(img, xf.ox, xf.oy, W * xf.s, H * xf.s);
    } else {
      ctx.fillStyle = '#ccc';
      ctx.font = '14px system-ui, sans-serif';
      ctx.fillText('loading image...', 20, 30);
    }
    const sel = findSelected();
    for (const b of view.boxes) {
      if (!isVisible(b)) continue;
      nVisible += 1;
      const isSel = sel && sel.type === 'box' && sel.rec.id === b.id;
      const moving = drag && drag.item && drag.item.type === 'box' && drag.item.rec.id === b.id && drag.shape;
      const xyxy = moving ? drag.shape.xyxy : b.xyxy;
      const c = colorOf(b.cls);
      const txt = b.cls + (b.score === null ? '' : ' ' + b.score.toFixed(2)) + (b.state === 'accepted' ? ' \u2713' : '');
      // pending: thin solid line; accepted: thick line, tinted, with a check mark
      drawBoxShape(xyxy, c, {width: b.state === 'accepted' ? 3 : 1.5, dash: [],
                             fill: b.state === 'accepted' ? c + '33' : null, text: txt, selected: isSel});
    }
    for (const p of view.prompts) {
      const isSel = sel && sel.type === 'prompt' && sel.rec.id === p.id;
      const moving = drag && drag.item && drag.item.type === 'prompt' && drag.item.rec.id === p.id && drag.shape;
      const c = p.negative ? '#ff2020' : colorOf(p.cls);
      if (p.kind === 'point') {
        drawPoint(moving ? drag.shape.xy : p.coords, colorOf(p.cls), p.negative, isSel);
      } else {
        drawBoxShape(moving ? drag.shape.xyxy : p.coords, c, {width: 3, dash: [10, 4], cross: p.negative,
          text: (p.negative ? 'NOT ' : 'prompt: ') + p.cls, selected: isSel});
      }
    }
    if (local && local.kind === 'box') {
      const c = local.negative ? '#ff2020' : (local.manual ? colorOf(view.active_class) : colorOf(view.active_class));
      drawBoxShape(local.xyxy, c, {width: 2, dash: local.manual ? [] : [10, 4], cross: local.negative});
    } else if (local && local.kind === 'point') {
      drawPoint(local.xy, colorOf(view.active_class), local.negative, false);
    }
  }
  root.dataset.visibleBoxes = String(nVisible);
  root.dataset.seq = String(view ? view.seq : -1);
  api.renders += 1;
  api.lastRender = {seq: view ? view.seq : -1, t: performance.now(), visible: nVisible,
                    action: view ? view.action : null, imageReady: imgReady};
  updateChrome();
}
function updateChrome() {
  for (const b of root.querySelectorAll('.tx-tool')) b.classList.toggle('active', b.dataset.tool === tool);
  negBox.checked = !!negBoxState();
  root.querySelector('.tx-neg-label').classList.toggle('on', !!negBoxState());
  const chip = root.querySelector('.tx-class-chip');
  if (view && view.active_class) {
    chip.textContent = view.active_class;
    chip.style.background = colorOf(view.active_class);
  } else {
    chip.textContent = 'no class yet';
    chip.style.background = '#888';
  }
  root.querySelector('.tx-zoom').firstChild.textContent = xf.fitted ? 'fit ' : Math.round(xf.s * 100) + '% ';
  if (view && view.image) {
    root.querySelector('.tx-image-name').textContent =
      (view.image.index + 1) + '/' + view.image.count + '  ' + view.image.file + '  [' + view.image.status + ']';
  } else {
    root.querySelector('.tx-image-name').textContent = '';
  }
  root.querySelector('.tx-message').textContent = (view && view.message) || '';
  const sel = findSelected();
  let s = '';
  if (sel && sel.type === 'box') {
    s = 'selected: ' + sel.rec.cls + (sel.rec.score === null ? ' (manual)' : ' ' + sel.rec.score.toFixed(2)) +
        ' ' + sel.rec.state + ' - A accept, X reject, E make it a prompt (Shift+E: negative), Del delete, 1-9 relabel';
  } else if (sel) {
    s = 'selected prompt: ' + sel.rec.cls + (sel.rec.negative ? ' (negative)' : '') + ' - Del delete, N toggle negative';
  }
  root.querySelector('.tx-sel').textContent = s;
}
let negative = false;
function negBoxState() { return negative; }

// ---------------------------------------------------------------- Python round trips
// every op names the image it was made on: Python refuses it if another image is current
// by then (a fast Next after drawing must not put the shape on the next image)
function send(op, data) {
  trigger('op', Object.assign({op: op, file: view && view.image ? view.image.file : null}, data || {}));
}
function select(it) {
  const next = it ? {type: it.type, id: it.rec.id} : null;
  const changed = JSON.stringify(next) !== JSON.stringify(selected);
  selected = next;
  if (changed) send('select', {id: next ? next.id : null, kind: next ? next.type : null});
  render();
}
function selectNextBox(dir) {
  const boxes = view ? view.boxes.filter(isVisible) : [];
  if (!boxes.length) return;
  const pending = boxes.filter(b => b.state === 'pending');
  const pool = pending.length ? pending : boxes;
  let i = selected && selected.type === 'box' ? pool.findIndex(b => b.id === selected.id) : -1;
  i = (i + dir + pool.length) % pool.length;
  if (i < 0) i = 0;
  select({type: 'box', rec: pool[i]});
}
function decide(state) {
  const sel = findSelected();
  if (!sel || sel.type !== 'box') return;
  sel.rec.state = state;  // optimistic
  send(state === 'accepted' ? 'accept' : 'reject', {id: sel.rec.id});
  selectNextBox(1);
}

// ---------------------------------------------------------------- navigation
// → / ← add up to a target image, sent as 'goto' with its index: presses made while a page
// change is still on its way are kept (Gradio drops a button click while the last one runs)
// and sent together once it is answered, so holding a key does not queue a page per press.
const nav = {target: null, waiting: false, sentAt: 0};
function navigate(delta) {
  if (!view || !view.image) { clickButton(delta > 0 ? 'tx-next' : 'tx-prev'); return; }
  const n = view.image.count;
  const from = nav.target !== null ? nav.target : view.image.index;
  nav.target = (((from + delta) % n) + n) % n;   // wraps around, as Next / Prev do
  if (!nav.waiting || performance.now() - nav.sentAt > 10000) sendNav();  // (an answer lost)
}
function sendNav() {
  nav.waiting = true;
  nav.sentAt = performance.now();
  send('goto', {index: nav.target});
}
function navAnswered(v) {  // a view arrived: the page change's answer, or another's
  if (!nav.waiting || !['nav', 'error', 'busy'].includes(v.action)) return;
  nav.waiting = false;
  if (v.action === 'nav' && v.image && nav.target !== null && v.image.index !== nav.target) sendNav();
  else nav.target = null;
}

// ---------------------------------------------------------------- mouse
canvas.addEventListener('contextmenu', e => e.preventDefault());
canvas.addEventListener('pointerdown', e => {
  if (!view || !view.image) return;
  root.focus({preventScroll: true});
  canvas.setPointerCapture(e.pointerId);
  const p = toImg(e);
  if (e.button === 1 || e.button === 2 || spaceDown) {
    drag = {mode: 'pan', sx: e.clientX, sy: e.clientY, ox: xf.ox, oy: xf.oy};
    return;
  }
  if (e.button !== 0) return;
  const sel = findSelected();
  const h = sel ? hitHandle(sel, p) : null;
  if (sel && h) { drag = {mode: 'resize', item: sel, handle: h, start: p, shape: null}; return; }
  const hit = hitTest(p);
  const inSel = sel && hit && hit.type === sel.type && hit.rec.id === sel.rec.id;
  if (inSel || (tool === 'select' && hit)) {
    if (!inSel) select(hit);
    drag = {mode: 'move', item: hit, start: p, shape: null};
    return;
  }
  if (tool === 'select') { select(null); return; }
  if (tool === 'point') {
    if (hit && hit.type === 'prompt' && hit.rec.kind === 'point') { select(hit); drag = {mode: 'move', item: hit, start: p, shape: null}; return; }
    drag = {mode: 'point', start: clampPt(p)};
    return;
  }
  drag = {mode: 'draw', start: clampPt(p), hit: hit};
});
canvas.addEventListener('pointermove', e => {
  if (!drag) return;
  const p = toImg(e);
  if (drag.mode === 'pan') {
    xf.ox = drag.ox + e.clientX - drag.sx;
    xf.oy = drag.oy + e.clientY - drag.sy;
    xf.fitted = false;
  } else if (drag.mode === 'draw') {
    const q = clampPt(p);
    local = {kind: 'box', manual: tool === 'manual', negative: negative && tool === 'box',
             xyxy: [Math.min(drag.start[0], q[0]), Math.min(drag.start[1], q[1]),
                    Math.max(drag.start[0], q[0]), Math.max(drag.start[1], q[1])]};
  } else if (drag.mode === 'move') {
    const dx = p[0] - drag.start[0], dy = p[1] - drag.start[1];
    const sh = shapeOf(drag.item);
    if (sh.kind === 'point') drag.shape = {kind: 'point', xy: clampPt([sh.xy[0] + dx, sh.xy[1] + dy])};
    else {
      const [x1, y1, x2, y2] = sh.xyxy, W = view.image.width, H = view.image.height;
      const ddx = Math.min(Math.max(dx, -x1), W - x2), ddy = Math.min(Math.max(dy, -y1), H - y2);
      drag.shape = {kind: 'box', xyxy: [x1 + ddx, y1 + ddy, x2 + ddx, y2 + ddy]};
    }
  } else if (drag.mode === 'resize') {
    let [x1, y1, x2, y2] = shapeOf(drag.item).xyxy;
    const q = clampPt(p), h = drag.handle;
    if (h.includes('w')) x1 = q[0];
    if (h.includes('e')) x2 = q[0];
    if (h.includes('n')) y1 = q[1];
    if (h.includes('s')) y2 = q[1];
    drag.shape = {kind: 'box', xyxy: [Math.min(x1, x2), Math.min(y1, y2), Math.max(x1, x2), Math.max(y1, y2)]};
  }
  render();
});
canvas.addEventListener('pointerup', e => {
  if (!drag) return;
  const d = drag;
  drag = null;
  if (deferred) queueMicrotask(onView);  // after this gesture's own op is sent
  if (d.mode === 'draw') {
    const box = local && local.kind === 'box' ? local.xyxy : null;
    const big = box && (box[2] - box[0]) * xf.s >= 4 && (box[3] - box[1]) * xf.s >= 4;
    if (big && tool === 'manual') {
      send('add_box', {coords: box});
    } else if (big) {
      send('add_prompt', {kind: 'box', coords: box, negative: negative});
    } else {
      local = null;
      select(d.hit || null);
      return;
    }
    render();  // keep the optimistic shape until Python's view arrives
    return;
  }
  if (d.mode === 'point') {
    local = {kind: 'point', xy: d.start, negative: negative};
    send('add_prompt', {kind: 'point', coords: d.start, negative: negative});
    render();
    return;
  }
  if ((d.mode === 'move' || d.mode === 'resize') && d.shape) {
    const coords = d.shape.kind === 'point' ? d.shape.xy : d.shape.xyxy;
    // optimistic update of the local copy
    if (d.item.type === 'box') { d.item.rec.xyxy = coords; if (d.item.rec.state === 'pending') d.item.rec.state = 'accepted'; }
    else d.item.rec.coords = coords;
    send('move', {id: d.item.rec.id, coords: coords});
  }
  render();
});
stage.addEventListener('pointerenter', () => { overStage = true; });
stage.addEventListener('pointerleave', () => { overStage = false; });
canvas.addEventListener('pointercancel', () => { drag = null; local = null; if (deferred) onView(); render(); });
stage.addEventListener('wheel', e => {
  if (!view || !view.image) return;
  e.preventDefault();
  const r = canvas.getBoundingClientRect();
  const cx = e.clientX - r.left, cy = e.clientY - r.top;
  const k = Math.exp(-e.deltaY * 0.0015);
  const s = Math.min(Math.max(xf.s * k, 0.05), 40);
  xf = {s: s, ox: cx - (cx - xf.ox) * s / xf.s, oy: cy - (cy - xf.oy) * s / xf.s, fitted: false};
  render();
}, {passive: false});

// ---------------------------------------------------------------- toolbar and keys
function setTool(t) { tool = t; local = null; render(); }
for (const b of root.querySelectorAll('.tx-tool')) b.addEventListener('click', () => setTool(b.dataset.tool));
negBox.addEventListener('change', () => { negative = negBox.checked; render(); });
root.querySelector('.tx-zoom').addEventListener('click', () => { fit(); render(); });

function onKey(e) {
  const t = e.target;
  if (t && (t.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(t.tagName))) return;
  if (!document.body.contains(root)) return;
  // letters by e.shiftKey, not by case: with Caps Lock on, 'a' must not accept every box
  const k = e.key.length === 1 ? e.key.toLowerCase() : e.key, ctrl = e.ctrlKey || e.metaKey;
  const shift = e.shiftKey;
  let handled = true;
  if (ctrl && k === 'z') clickButton(shift ? 'tx-redo' : 'tx-undo');
  else if (ctrl && k === 'y') clickButton('tx-redo');
  else if (ctrl || e.altKey) handled = false;
  else if (k === 'b') setTool('box');
  else if (k === 'p') setTool('point');
  else if (k === 'm') setTool('manual');
  else if (k === 'v') setTool('select');
  else if (k === 'n') {
    const sel = findSelected();
    if (sel && sel.type === 'prompt') { sel.rec.negative = !sel.rec.negative; send('negative', {id: sel.rec.id, value: sel.rec.negative}); render(); }
    else { negative = !negative; render(); }
  }
  else if (k === 'a' && !shift) decide('accepted');
  else if (k === 'a') clickButton('tx-accept-all');
  else if (k === 'x' || k === 'r') decide('rejected');
  else if (k === 'e') {   // the selected box becomes a prompt: E exemplar, Shift+E negative
    const sel = findSelected();
    if (sel && sel.type === 'box') { send('promote', {id: sel.rec.id, negative: shift}); selected = null; }
    else root.querySelector('.tx-message').textContent = 'E: select a box first (Tab or a click), then press E';
  }
  else if (k === 'Delete' || k === 'Backspace') {
    const sel = findSelected();
    if (sel) { send('delete', {id: sel.rec.id}); selected = null; }
  }
  else if (k === 'd' && !shift) clickButton('tx-detect-this');
  else if (k === 'd') clickButton('tx-detect-all');
  else if (k === 'ArrowRight' || k === '.') navigate(1);
  else if (k === 'u') clickButton('tx-next-review');
  else if (k === 'ArrowLeft' || k === ',') navigate(-1);
  else if (k === 'Tab' && document.activeElement === root) selectNextBox(e.shiftKey ? -1 : 1);
  else if (k === 'Escape') { selected = null; local = null; drag = null; send('select', {id: null}); render(); }
  else if (k === '0') { fit(); render(); }
  else if (k === ' ' && (overStage || document.activeElement === root || document.activeElement === document.body)) {
    spaceDown = true;  // (over the image, a focused button, e.g. Detect in all images, must not fire)
  }
  else if (/^[1-9]$/.test(k) && view && view.classes[Number(k) - 1]) {
    const cls = view.classes[Number(k) - 1].name;
    const sel = findSelected();
    send('set_class', {cls: cls, id: sel ? sel.rec.id : null});
  }
  else handled = false;
  if (handled) e.preventDefault();
}
// The threshold slider redraws at once on every movement; Python persists it on change.
function onSlider(e) {
  const t = e.target;
  if (!view || !t || !t.closest || !t.closest('#tx-threshold')) return;
  const x = parseFloat(t.value);
  if (!isNaN(x) && x >= 0 && x <= 1) { view.threshold = x; render(); }
}
if (api.sliderHandler) document.removeEventListener('input', api.sliderHandler);
api.sliderHandler = onSlider;
document.addEventListener('input', onSlider);
function onKeyUp(e) {
  if (e.key === ' ' && spaceDown) { spaceDown = false; e.preventDefault(); }
}
if (api.keyHandler) document.removeEventListener('keydown', api.keyHandler);
if (api.keyUpHandler) document.removeEventListener('keyup', api.keyUpHandler);
api.keyHandler = onKey;
api.keyUpHandler = onKeyUp;
document.addEventListener('keydown', onKey);
document.addEventListener('keyup', onKeyUp);

// ---------------------------------------------------------------- Python -> JS
let deferred = false;         // a view from another tab's save, kept for the drag's end
function onView() {
  const v = props.value;
  if (!v || typeof v !== 'object') return;
  if (drag && v.action === 'sync') { deferred = true; return; }
  deferred = false;
  const newImage = !view || !view.image || !v.image || view.image.url !== v.image.url;
  const sameFile = view && view.image && v.image && view.image.file === v.image.file;
  view = v;
  local = null;
  navAnswered(v);
  if (!sameFile) { selected = null; xf.fitted = true; }
  if (selected && !findSelected()) selected = null;
  if (v.image && newImage) {
    imgReady = false;
    const token = imgUrl = v.image.url;
    img.onload = () => { if (imgUrl === token) { imgReady = true; render(); } };
    img.onerror = () => { if (imgUrl === token) { view.message = 'could not load the preview image'; render(); } };
    img.src = imgUrl;
  }
  render();
}
api.getView = () => view;
api.send = send;
api.getState = () => ({tool: tool, negative: negative, selected: selected, transform: xf});
api.select = (type, id) => { const it = items().find(i => i.type === type && i.rec.id === id); select(it || null); };
new ResizeObserver(() => render()).observe(stage);
watch('value', onView);
onView();
