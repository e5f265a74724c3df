// Runs before BokehJS. The map asks for WebGL (fast with a GPU). Where the browser's WebGL is a
// software emulation (no GPU: SwiftShader, llvmpipe, ...), drawing 100,000 points that way takes
// seconds per repaint, and Bokeh's canvas renderer is about 5x faster. So in that case we hide
// WebGL from this page and Bokeh falls back to canvas by itself.
// ?renderer=webgl forces WebGL, ?renderer=canvas forces canvas.
(function () {
  var asked = new URLSearchParams(window.location.search).get("renderer");
  var renderer = "webgl";
  var why = "a GPU";
  if (asked === "canvas") {
    renderer = "canvas";
    why = "asked for in the URL";
  } else if (asked !== "webgl") {
    try {
      var gl = document.createElement("canvas").getContext("webgl");
      if (gl == null) {
        renderer = "canvas";
        why = "no WebGL in this browser";
      } else {
        var info = gl.getExtension("WEBGL_debug_renderer_info");
        var name = String(gl.getParameter(info ? info.UNMASKED_RENDERER_WEBGL : gl.RENDERER));
        if (/swiftshader|llvmpipe|softpipe|software|basic render/i.test(name)) {
          renderer = "canvas";
          why = "WebGL is software-emulated here (" + name + ")";
        }
        var lose = gl.getExtension("WEBGL_lose_context");
        if (lose) lose.loseContext();
      }
    } catch (e) { /* keep the default */ }
  }
  if (renderer === "canvas") {
    var getContext = HTMLCanvasElement.prototype.getContext;
    HTMLCanvasElement.prototype.getContext = function (type) {
      if (/webgl/i.test(String(type))) return null;
      return getContext.apply(this, arguments);
    };
  }
  window.explorerRenderer = {renderer: renderer, why: why};
  // the modifier keys of the last press/release: big maps send the lasso's geometry to the
  // server with the selection mode (Shift = append, Ctrl = intersect, both = subtract)
  window.explorerKeys = {shift: false, ctrl: false};
  var keys = function (e) { window.explorerKeys = {shift: !!e.shiftKey, ctrl: !!e.ctrlKey}; };
  window.addEventListener("pointerdown", keys, {capture: true, passive: true});
  window.addEventListener("pointerup", keys, {capture: true, passive: true});
})();
