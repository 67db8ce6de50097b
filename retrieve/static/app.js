// geovote's page: upload a photo to /locate and draw the answer on an equirectangular world map.
"use strict";
const $ = (id) => document.getElementById(id);

function haversineKm(lat1, lon1, lat2, lon2) {
  const r = Math.PI / 180, R = 6371;
  const a = Math.sin((lat2 - lat1) * r / 2) ** 2 +
            Math.cos(lat1 * r) * Math.cos(lat2 * r) * Math.sin((lon2 - lon1) * r / 2) ** 2;
  return 2 * R * Math.asin(Math.sqrt(Math.min(1, a)));
}

function marker(kind, lat, lon, title) {
  const m = document.createElement("div");
  m.className = `marker ${kind}`;
  m.style.left = `${(lon + 180) / 360 * 100}%`;
  m.style.top = `${(90 - lat) / 180 * 100}%`;
  m.title = title;
  m.dataset.lat = lat;
  m.dataset.lon = lon;
  $("map").appendChild(m);
}

// the circle of radius_km around the answer, as it lies on the equirectangular map (an ellipse)
function radiusCircle(lat, lon, km) {
  const c = document.createElement("div");
  c.className = "marker radius";
  c.id = "radius";
  const dLat = km / 111.195, dLon = km / (111.195 * Math.max(Math.cos(lat * Math.PI / 180), 0.01));
  c.style.left = `${(lon + 180) / 360 * 100}%`;
  c.style.top = `${(90 - lat) / 180 * 100}%`;
  c.style.width = `${Math.min(2 * dLon, 360) / 360 * 100}%`;
  c.style.height = `${Math.min(2 * dLat, 180) / 180 * 100}%`;
  c.title = `the true place is within ${Math.round(km).toLocaleString()} km with 90% probability`;
  $("map").appendChild(c);
}

function show(a) {
  document.querySelectorAll(".marker").forEach((m) => m.remove());
  if (a.radius_km != null) radiusCircle(a.latitude, a.longitude, a.radius_km);
  for (const n of a.neighbours) marker("neighbour", n.latitude, n.longitude, `${n.id} (${n.similarity})`);
  a.candidates.slice(1).forEach((c) => marker("alternative", c.latitude, c.longitude, `score ${c.score}`));
  marker("answer", a.latitude, a.longitude, "answer");
  const place = [a.city, a.region, a.country].filter(Boolean).join(", ");
  const osm = `https://www.openstreetmap.org/?mlat=${a.latitude}&mlon=${a.longitude}#map=10/${a.latitude}/${a.longitude}`;
  const rows = a.candidates.slice(1).map((c, i) =>
    `<tr><td>${i + 2}</td><td>${c.latitude.toFixed(4)}, ${c.longitude.toFixed(4)}</td>` +
    `<td>${(100 * c.score).toFixed(0)}%</td>` +
    `<td>${Math.round(haversineKm(a.latitude, a.longitude, c.latitude, c.longitude)).toLocaleString()} km</td></tr>`).join("");
  $("result").innerHTML =
    `<div class="place" id="place">${place}</div>` +
    `<div id="coords">${a.latitude.toFixed(5)}, ${a.longitude.toFixed(5)}</div>` +
    (a.calibrated
      ? `<div><b id="confidence">${(100 * a.confidence).toFixed(0)}%</b> probability within 200 km · ` +
        `90% within <b id="radius-km">${Math.round(a.radius_km).toLocaleString()} km</b> · ` +
        `<a href="${osm}" target="_blank" rel="noopener">OpenStreetMap</a></div>` +
        (a.far_pick
          ? `<div id="far-pick">looks far from every training image: ` +
            `answered by the neighbour that fits best once the gallery's density is discounted</div>`
          : "")
      : `<div>vote share <b id="confidence">${(100 * a.confidence).toFixed(0)}%</b> (not calibrated) · ` +
        `<a href="${osm}" target="_blank" rel="noopener">OpenStreetMap</a></div>`) +
    (rows ? `<table><tr><th>#</th><th>alternative</th><th>${a.calibrated ? "within 200 km" : "vote share"}</th><th>from the answer</th></tr>${rows}</table>` : "");
  showEvidence(a.neighbours.slice(0, 8));
}

// why the engine thinks so: its nearest gallery images, served by the server from that gallery only
function showEvidence(neighbours) {
  const box = $("evidence");
  box.replaceChildren();
  for (const n of neighbours) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `/gallery/${encodeURIComponent(n.id)}`;
    img.alt = `gallery image ${n.id}`;
    img.title = `${n.id}: similarity ${n.similarity}, ${n.latitude.toFixed(3)}, ${n.longitude.toFixed(3)}`;
    const cap = document.createElement("figcaption");
    cap.textContent = `${n.latitude.toFixed(2)}, ${n.longitude.toFixed(2)}`;
    fig.append(img, cap);
    box.appendChild(fig);
  }
}

async function locate(file) {
  $("error").textContent = "";
  $("result").textContent = "locating...";
  $("preview").src = URL.createObjectURL(file);
  $("preview").style.display = "block";
  const form = new FormData();
  form.append("image", file);
  try {
    const r = await fetch("/locate", { method: "POST", body: form });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    show(body);
  } catch (e) {
    $("result").textContent = "";
    $("error").textContent = e.message;
  }
}

const drop = $("drop");
drop.addEventListener("click", () => $("file").click());
drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
$("file").addEventListener("change", (e) => { if (e.target.files[0]) locate(e.target.files[0]); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) locate(e.dataTransfer.files[0]);
});
fetch("/health").then((r) => r.json()).then((h) => {
  $("health").textContent = `${h.images.toLocaleString()} training images · ${h.backbone}`;
});
