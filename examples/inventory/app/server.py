"""The inventory service: stock levels and orders over HTTP, from the SQLite database."""

import json
import sqlite3
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DB = sys.argv[1]


class Handler(BaseHTTPRequestHandler):
    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        with sqlite3.connect(DB) as db:
            if self.path == "/stats":
                items, stock = db.execute("SELECT COUNT(*), SUM(stock) FROM items").fetchone()
                return self.reply(200, {"items": items, "stock": stock})
            if self.path.startswith("/items/"):
                row = db.execute("SELECT name, stock FROM items WHERE id = ?",
                                 (int(self.path.rsplit("/", 1)[1]),)).fetchone()
                if row is None:
                    return self.reply(404, {"error": "no such item"})
                return self.reply(200, {"name": row[0], "stock": row[1]})
        return self.reply(404, {"error": "unknown path"})

    def do_POST(self):  # /order/<item>/<qty>
        _, _, item, qty = self.path.split("/")
        with sqlite3.connect(DB) as db:
            (stock,) = db.execute("SELECT stock FROM items WHERE id = ?", (int(item),)).fetchone()
            if stock < int(qty):
                return self.reply(409, {"error": "not enough stock", "stock": stock})
            db.execute("UPDATE items SET stock = stock - ? WHERE id = ?", (int(qty), int(item)))
            db.execute("INSERT INTO orders (item, qty) VALUES (?, ?)", (int(item), int(qty)))
        return self.reply(201, {"stock": stock - int(qty)})

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
