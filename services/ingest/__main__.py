from libs.common.launch import service_main
from services.ingest import app

service_main(app)
